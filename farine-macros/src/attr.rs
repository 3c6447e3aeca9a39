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
    // `#[rpc::client("service")]`: the service as a bare string, as in the Python framework.
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
        if !kind.keys().contains(&key.as_str()) && kind.settings().contains(&key.as_str()) {
            // A config key: a string, number or boolean, or a bare flag for `true`.
            let value = if meta.input.is_empty() || meta.input.peek(syn::Token![,]) {
                "true".to_string()
            } else {
                match meta.value()?.parse::<syn::Lit>()? {
                    syn::Lit::Str(text) => text.value(),
                    syn::Lit::Int(number) => number.base10_digits().to_string(),
                    syn::Lit::Float(number) => number.base10_digits().to_string(),
                    syn::Lit::Bool(flag) => flag.value.to_string(),
                    other => {
                        return Err(syn::Error::new(
                            other.span(),
                            "a config value is a string, a number or a boolean",
                        ));
                    }
                }
            };
            if args.settings.iter().any(|(k, _)| *k == key) {
                return Err(meta.error(format!("`{key}` is given twice")));
            }
            args.settings.push((key, value));
            return Ok(());
        }
        if !kind.keys().contains(&key.as_str()) {
            let written = meta
                .path
                .segments
                .iter()
                .map(|s| s.ident.to_string())
                .collect::<Vec<_>>()
                .join("::");
            let hint = match closest(&written, kind.keys().iter().chain(kind.settings())) {
                Some(near) => format!(" (did you mean `{near}`?)"),
                None => String::new(),
            };
            let mut takes: Vec<&str> = kind.keys().to_vec();
            takes.extend(kind.settings().iter().filter(|k| !kind.keys().contains(k)));
            return Err(meta.error(format!(
                "unknown key `{written}` for {}{hint}; it takes: {}",
                kind.display(),
                takes.join(", ")
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

/// The key of `known` closest to `key`, at most two edits away.
fn closest<'a>(key: &str, known: impl Iterator<Item = &'a &'a str>) -> Option<&'a str> {
    let distance = |a: &[u8], b: &[u8]| {
        let mut previous: Vec<usize> = (0..=b.len()).collect();
        for (i, x) in a.iter().enumerate() {
            let mut current = vec![i + 1; b.len() + 1];
            for (j, y) in b.iter().enumerate() {
                current[j + 1] = (previous[j] + usize::from(x != y))
                    .min(previous[j + 1] + 1)
                    .min(current[j] + 1);
            }
            previous = current;
        }
        previous[b.len()]
    };
    known
        .map(|candidate| (distance(key.as_bytes(), candidate.as_bytes()), *candidate))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, candidate)| candidate)
}
