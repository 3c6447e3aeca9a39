//! Reading attributes: which ones are farine's, and their arguments.

use syn::{Attribute, LitStr, Path};

use crate::ctxt::Ctxt;
use crate::model::{AttrKind, HandlerArgs, ServiceArgs};

/// The argument the service macro leaves in a handler attribute it has processed, so the
/// attribute expands to nothing (and a user's `use farine::consume;` stays used).
pub const CHECKED_MARKER: &str = "__farine_checked";

/// Which farine handler attribute `path` names, by its last segments (`consume`,
/// `farine::consume`, `rpc::method`, `farine::rpc::method`, ...).
pub fn classify(path: &Path) -> Option<AttrKind> {
    let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    let last = segments.last()?.as_str();
    let parent = segments.len().checked_sub(2).map(|i| segments[i].as_str());
    match (parent, last) {
        (_, "consume") => Some(AttrKind::Consume),
        (_, "publish") => Some(AttrKind::Publish),
        (_, "execute") => Some(AttrKind::Execute),
        (Some("rpc"), "method") => Some(AttrKind::RpcMethod),
        (Some("rpc"), "client") => Some(AttrKind::RpcClient),
        (Some("stream"), "http") => Some(AttrKind::StreamHttp),
        _ => None,
    }
}

/// Parses `#[farine::service(name = "...", init = path)]`.
pub fn parse_service_args(cx: &Ctxt, args: proc_macro2::TokenStream) -> ServiceArgs {
    let mut parsed = ServiceArgs::default();
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            let lit: LitStr = meta.value()?.parse()?;
            let name = lit.value();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(syn::Error::new(
                    lit.span(),
                    "a service name is letters, digits, `_` and `-` (it names the config section)",
                ));
            }
            parsed.name = Some((name, lit.span()));
            Ok(())
        } else if meta.path.is_ident("init") {
            parsed.init = Some(meta.value()?.parse()?);
            Ok(())
        } else if meta.path.is_ident("implements") {
            parsed.implements = Some(meta.value()?.parse()?);
            Ok(())
        } else {
            Err(meta.error(
                "unknown key for #[farine::service]; expected `name = \"...\"`, `init = path::to::fn` or `implements = path::to::Interface`",
            ))
        }
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.syn_error(e);
    }
    parsed
}

/// Parses the arguments of a handler attribute, reporting unknown and repeated keys.
pub fn parse_handler_args(cx: &Ctxt, kind: AttrKind, attr: &Attribute) -> HandlerArgs {
    let mut args = HandlerArgs::default();
    if matches!(attr.meta, syn::Meta::Path(_)) {
        return args;
    }
    // `#[rpc::client("service")]`: the service as a bare string, as in the seed.
    if kind == AttrKind::RpcClient
        && let Ok(lit) = attr.parse_args::<LitStr>()
    {
        args.service = Some(lit.value());
        return args;
    }
    let result = attr.parse_nested_meta(|meta| {
        let key = meta
            .path
            .get_ident()
            .map(|i| i.to_string())
            .unwrap_or_default();
        if !kind.keys().contains(&key.as_str()) {
            return Err(meta.error(format!(
                "unknown key `{}` for {}; expected one of: {}",
                meta.path
                    .segments
                    .iter()
                    .map(|s| s.ident.to_string())
                    .collect::<Vec<_>>()
                    .join("::"),
                kind.display(),
                kind.keys().join(", ")
            )));
        }
        if key == "stream" {
            args.stream = true;
            return Ok(());
        }
        let lit: LitStr = meta.value()?.parse()?;
        let slot = match key.as_str() {
            "exchange" => &mut args.exchange,
            "routing_key" => &mut args.routing_key,
            "service" => &mut args.service,
            _ => &mut args.queue,
        };
        if slot.is_some() {
            return Err(meta.error(format!("`{key}` is given twice")));
        }
        *slot = Some(lit.value());
        Ok(())
    });
    if let Err(e) = result {
        cx.syn_error(e);
    }
    args
}

/// True when `args` is exactly the marker the service macro leaves.
pub fn is_checked_marker(args: &proc_macro2::TokenStream) -> bool {
    let mut tokens = args.clone().into_iter();
    matches!(
        (tokens.next(), tokens.next()),
        (Some(proc_macro2::TokenTree::Ident(ident)), None) if ident == CHECKED_MARKER
    )
}
