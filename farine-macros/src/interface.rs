//! `#[rpc::interface]`: one declaration of a service's RPC methods, from which the typed client
//! is generated and which the server implements (`#[farine::service(implements = Trait)]`), so
//! a wrong argument or result type is a compile error on either side.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use syn::{FnArg, ItemTrait, LitStr, Pat, ReturnType, TraitItem, Type};

use crate::ctxt::Ctxt;

/// The `T` of `Result<T, E>`, when `ty` is written as a `Result`.
fn result_ok_type(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    args.args.iter().find_map(|arg| match arg {
        syn::GenericArgument::Type(ty) => Some(ty),
        _ => None,
    })
}

/// The item type of an `impl Stream<Item = X>`.
fn stream_item(ty: &Type) -> Option<&Type> {
    let Type::ImplTrait(impl_trait) = ty else {
        return None;
    };
    impl_trait.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let last = bound.path.segments.last()?;
        if last.ident != "Stream" {
            return None;
        }
        let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
            return None;
        };
        args.args.iter().find_map(|arg| match arg {
            syn::GenericArgument::AssocType(assoc) if assoc.ident == "Item" => Some(&assoc.ty),
            _ => None,
        })
    })
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let cx = Ctxt::default();
    let mut service = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("service") {
            let lit: LitStr = meta.value()?.parse()?;
            service = Some(lit.value());
            Ok(())
        } else {
            Err(meta.error("unknown key for #[rpc::interface]; expected `service = \"...\"`"))
        }
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.syn_error(e);
    }
    let item: ItemTrait = match syn::parse2(item) {
        Ok(item) => item,
        Err(_) => {
            return syn::Error::new(
                Span::call_site(),
                "#[rpc::interface] goes on a trait that declares a service's RPC methods",
            )
            .to_compile_error();
        }
    };
    let Some(service) = service else {
        cx.error_spanned_by(
            &item.ident,
            "#[rpc::interface] needs the service it describes: #[rpc::interface(service = \"name\")]",
        );
        let errors = cx.finish();
        return quote!(#item #errors);
    };

    let vis = &item.vis;
    let trait_name = &item.ident;
    let client_name = format_ident!("{}Client", trait_name);
    let mut methods = Vec::new();
    for trait_item in &item.items {
        let TraitItem::Fn(method) = trait_item else {
            continue;
        };
        let sig = &method.sig;
        let name = &sig.ident;
        let wire_name = name.to_string();
        let mut params = Vec::new();
        for input in sig.inputs.iter().skip(1) {
            let FnArg::Typed(typed) = input else { continue };
            let Pat::Ident(pat) = &*typed.pat else {
                cx.error_spanned_by(&typed.pat, "an interface parameter needs a plain name");
                continue;
            };
            params.push((pat.ident.clone(), (*typed.ty).clone()));
        }
        if !matches!(sig.inputs.first(), Some(FnArg::Receiver(_))) {
            cx.error_spanned_by(sig, "an interface method takes `&self` first");
            continue;
        }
        let docs = method.attrs.iter().filter(|a| a.path().is_ident("doc"));
        let param_decls = params.iter().map(|(name, ty)| quote!(#name: #ty));
        let param_names = params.iter().map(|(name, _)| name);
        let args = quote!(::farine::rpc::Args::new() #(.arg(#param_names))*);
        let output = match &sig.output {
            ReturnType::Default => None,
            ReturnType::Type(_, ty) => Some(&**ty),
        };
        let body = match output.and_then(stream_item) {
            Some(item) => {
                let item = result_ok_type(item).unwrap_or(item);
                quote! {
                    -> ::std::result::Result<::farine::rpc::RpcStream<#item>, ::farine::rpc::RpcError> {
                        self.client.stream::<#item>(#wire_name, #args).await
                    }
                }
            }
            None => {
                let value = match output {
                    None => quote!(()),
                    Some(ty) => {
                        let ty = result_ok_type(ty).unwrap_or(ty);
                        quote!(#ty)
                    }
                };
                quote! {
                    -> ::std::result::Result<#value, ::farine::rpc::RpcError> {
                        self.client.call::<#value>(#wire_name, #args).await
                    }
                }
            }
        };
        methods.push(quote! {
            #(#docs)*
            #vis async fn #name(&self, #(#param_decls),*) #body
        });
    }
    let errors = cx.finish();
    let client_doc = format!(
        "The typed client of service `{service}`, generated from [`{trait_name}`]: each method calls the service's RPC method of the same name."
    );
    quote! {
        #[allow(async_fn_in_trait)]
        #item

        #[doc = #client_doc]
        #[derive(Clone, Debug)]
        #vis struct #client_name {
            client: ::farine::rpc::Client,
        }

        impl #client_name {
            /// The service this interface describes.
            #vis const SERVICE: &'static str = #service;

            /// A typed client over `client` (which must target the same service).
            #vis fn new(client: ::farine::rpc::Client) -> Self {
                Self { client }
            }

            /// A client of its own connection to `uri` (tests, tools).
            #vis async fn connect(
                uri: &str,
                timeout: ::std::time::Duration,
            ) -> ::std::result::Result<Self, ::farine::rpc::RpcError> {
                ::farine::rpc::Client::connect(uri, #service, timeout).await.map(Self::new)
            }

            /// The same client with another timeout for each call.
            #vis fn with_timeout(&self, timeout: ::std::time::Duration) -> Self {
                Self::new(self.client.with_timeout(timeout))
            }

            /// The untyped client underneath.
            #vis fn client(&self) -> &::farine::rpc::Client {
                &self.client
            }

            #(#methods)*
        }

        impl ::std::convert::From<::farine::rpc::Client> for #client_name {
            fn from(client: ::farine::rpc::Client) -> Self {
                Self::new(client)
            }
        }

        #errors
    }
}
