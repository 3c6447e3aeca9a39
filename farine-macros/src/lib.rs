//! The attribute macros of farine. Users reach them through `farine` (`farine::service`,
//! `farine::consume`, `farine::rpc::method`, ...), never through this crate.
//!
//! `#[farine::service]` does the work, in four steps as serde_derive does: parse the impl block
//! and its attributes into a model (`attr`, `model`), check each handler's signature (`check`),
//! and generate the registration (`generate`), collecting every error on the way (`ctxt`). The
//! handler attributes on their own only check that they sit inside a service.

mod attr;
mod check;
mod ctxt;
mod generate;
mod interface;
mod keys;
mod model;

use proc_macro::TokenStream;

/// Registers the methods of a service's `impl` block as farine handlers.
///
/// Arguments (both optional): `name = "..."` (default: the lower-cased struct name; it also names
/// the config section) and `init = path::to::fn`, a `fn(&farine::config::Section) -> Result<Self, E>`
/// used instead of `Default` to build the service.
#[proc_macro_attribute]
pub fn service(args: TokenStream, item: TokenStream) -> TokenStream {
    let cx = ctxt::Ctxt::default();
    let service_args = attr::parse_service_args(&cx, args.into());
    let item: syn::ItemImpl = match syn::parse(item) {
        Ok(item) => item,
        Err(_) => {
            return syn::Error::new(
                proc_macro2::Span::call_site(),
                "#[farine::service] goes on the `impl` block of the service struct: `#[farine::service] impl MyService { ... }`",
            )
            .to_compile_error()
            .into();
        }
    };
    generate::service(cx, service_args, item).into()
}

fn standalone(name: &str, args: TokenStream, item: TokenStream) -> TokenStream {
    if attr::is_checked_marker(&args.into()) {
        return item;
    }
    let error = syn::Error::new(
        proc_macro2::Span::call_site(),
        format!(
            "#[{name}] must be on a method of an `impl` block annotated with #[farine::service]"
        ),
    )
    .to_compile_error();
    let item = proc_macro2::TokenStream::from(item);
    quote::quote!(#error #item).into()
}

/// Consumes a queue bound to `exchange` with `routing_key`: its reference is the re-export in `farine` (`cargo doc -p farine`).
#[proc_macro_attribute]
pub fn consume(args: TokenStream, item: TokenStream) -> TokenStream {
    standalone("consume", args, item)
}

/// Publishes to `exchange` with `routing_key` through the `Publisher` farine supplies.
#[proc_macro_attribute]
pub fn publish(args: TokenStream, item: TokenStream) -> TokenStream {
    standalone("publish", args, item)
}

/// A method farine runs, and runs again when it returns: its reference is the re-export in `farine` (`cargo doc -p farine`).
#[proc_macro_attribute]
pub fn execute(args: TokenStream, item: TokenStream) -> TokenStream {
    standalone("execute", args, item)
}

/// Exposes a method over RPC under the service's name: its reference is the re-export in `farine` (`cargo doc -p farine`).
#[proc_macro_attribute]
pub fn rpc_method(args: TokenStream, item: TokenStream) -> TokenStream {
    standalone("rpc::method", args, item)
}

/// Supplies an RPC client of another service to a method: its reference is the re-export in `farine` (`cargo doc -p farine`).
#[proc_macro_attribute]
pub fn rpc_client(args: TokenStream, item: TokenStream) -> TokenStream {
    standalone("rpc::client", args, item)
}

/// Declares a service's RPC methods once, for a typed client and a checked server.
#[proc_macro_attribute]
pub fn rpc_interface(args: TokenStream, item: TokenStream) -> TokenStream {
    interface::expand(args.into(), item.into()).into()
}

/// A handler for each event of the service's Server-Sent-Events endpoint: its reference is the re-export in `farine` (`cargo doc -p farine`).
#[proc_macro_attribute]
pub fn stream_http(args: TokenStream, item: TokenStream) -> TokenStream {
    standalone("stream::http", args, item)
}

/// The package's `migrations/*.sql` files (named `<version>_<description>.sql`), embedded as
/// `&[farine::db::EmbeddedMigration]`; `&[]` when there is no such folder. Used by
/// `farine::main!()`.
#[proc_macro]
pub fn embed_migrations(_input: TokenStream) -> TokenStream {
    let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") else {
        return quote::quote!(&[]).into();
    };
    let folder = std::path::Path::new(&dir).join("migrations");
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&folder) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(stem) = name.strip_suffix(".sql") else {
                continue;
            };
            let Some((version, description)) = stem.split_once('_') else {
                continue;
            };
            let Ok(version) = version.parse::<i64>() else {
                continue;
            };
            found.push((version, description.replace('_', " "), entry.path()));
        }
    }
    found.sort_by_key(|(version, _, _)| *version);
    let items = found.iter().map(|(version, description, path)| {
        let path = path.to_string_lossy().to_string();
        quote::quote! {
            ::farine::db::EmbeddedMigration {
                version: #version,
                description: #description,
                sql: ::std::include_str!(#path),
            }
        }
    });
    quote::quote!(&[#(#items),*]).into()
}
