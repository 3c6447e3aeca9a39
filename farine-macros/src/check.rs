//! Checking handlers: the signature each kind needs, with one sentence per mistake that says
//! what is expected, pointed at the offending tokens.

use syn::{Attribute, FnArg, ImplItemFn, ReturnType, Type};

use crate::ctxt::Ctxt;
use crate::model::{
    AttrKind, Consume, Execute, Extracted, HandlerArgs, HandlerModel, Publish, ReplyShape,
    RpcClient, RpcMethod, Sse,
};

const CONSUME_SIGNATURE: &str = "expected `async fn name(&self, body: T, ...) -> Result<(), E>` (E: Display) or nothing, where each parameter is taken from the message: the body (any `serde::Deserialize` type), `farine::Message`, `farine::Headers`, `farine::Db`, `farine::Shutdown`, or a type that implements `farine::FromCall<farine::Message>`";
const PUBLISH_SIGNATURE: &str =
    "expected `async fn name(&self, publisher: farine::Publisher, ...)`";

/// The last segment of a type's path and whether it is behind a reference, for paths that can
/// name farine's types: a single segment (`Message`, brought in by `use`) or a path starting
/// with `farine` (`farine::Message`). `events::Message` is the user's own type, not farine's.
fn farine_type_name(ty: &Type) -> Option<(String, bool)> {
    match ty {
        Type::Reference(reference) => {
            farine_type_name(&reference.elem).map(|(name, _)| (name, true))
        }
        Type::Path(path) if path.qself.is_none() => {
            let segments = &path.path.segments;
            let first = segments.first()?;
            (segments.len() == 1 || first.ident == "farine")
                .then(|| segments.last().map(|s| (s.ident.to_string(), false)))
                .flatten()
        }
        Type::Group(group) => farine_type_name(&group.elem),
        _ => None,
    }
}

/// The parameters after `&self`, each taken from the call by `farine::FromCall` (checked by the
/// compiler, at the parameter): `T`, or `&T` to borrow it. `None` after reporting a parameter
/// that cannot be taken (`&mut T`).
fn extracted(cx: &Ctxt, sig: &syn::Signature, signature: &str) -> Option<Vec<Extracted>> {
    let mut params = Vec::new();
    let mut ok = true;
    for input in sig.inputs.iter().skip(1) {
        let FnArg::Typed(typed) = input else { continue };
        match &*typed.ty {
            Type::Reference(reference) if reference.mutability.is_some() => {
                cx.error_spanned_by(
                    reference,
                    format!("a handler parameter is taken from its call: take `T`, or `&T` to borrow it, not `&mut T`: {signature}"),
                );
                ok = false;
            }
            Type::Reference(reference) => params.push(Extracted {
                ty: reference.elem.clone(),
                by_ref: true,
            }),
            ty => params.push(Extracted {
                ty: Box::new(ty.clone()),
                by_ref: false,
            }),
        }
    }
    ok.then_some(params)
}

/// No generic parameters: farine calls the method with the types it takes.
fn check_not_generic(cx: &Ctxt, kind: AttrKind, sig: &syn::Signature, signature: &str) -> bool {
    if sig.generics.params.is_empty() {
        return true;
    }
    cx.error_spanned_by(
        &sig.generics,
        format!(
            "a {} handler cannot be generic: {signature}",
            kind.display()
        ),
    );
    false
}

/// The common shape: `async`, `&self` (for handlers the runtime calls).
fn check_common(cx: &Ctxt, kind: AttrKind, method: &ImplItemFn, signature: &str) -> bool {
    let sig = &method.sig;
    let mut ok = check_receiver(cx, kind, method, signature);
    if sig.asyncness.is_none() {
        cx.error_spanned_by(
            sig.fn_token,
            format!(
                "a {} method must be `async fn`: {signature}",
                kind.display()
            ),
        );
        ok = false;
    }
    ok
}

/// `&self` first.
fn check_receiver(cx: &Ctxt, kind: AttrKind, method: &ImplItemFn, signature: &str) -> bool {
    let sig = &method.sig;
    let mut ok = true;
    match sig.inputs.first() {
        Some(FnArg::Receiver(receiver))
            if receiver.reference.is_some() && receiver.mutability.is_none() => {}
        Some(FnArg::Receiver(receiver)) => {
            cx.error_spanned_by(
                receiver,
                format!(
                    "a {} method takes `&self` (farine shares the service between concurrent calls): {signature}",
                    kind.display()
                ),
            );
            ok = false;
        }
        _ => {
            cx.error_spanned_by(
                &sig.ident,
                format!(
                    "a {} method takes `&self` first: {signature}",
                    kind.display()
                ),
            );
            ok = false;
        }
    }
    ok
}

pub fn consume(
    cx: &Ctxt,
    method: &ImplItemFn,
    args: HandlerArgs,
    attribute: &Attribute,
) -> Option<HandlerModel> {
    let mut ok = check_common(cx, AttrKind::Consume, method, CONSUME_SIGNATURE);
    let sig = &method.sig;
    if !sig.generics.params.is_empty() {
        cx.error_spanned_by(
            &sig.generics,
            format!("a #[consume] handler cannot be generic: {CONSUME_SIGNATURE}"),
        );
        ok = false;
    }
    let params = extracted(cx, sig, CONSUME_SIGNATURE);
    // Any return type is checked by the `IntoOutcome` bound, whose message says what is
    // expected, pointed at this span: aliases of `Result` and `()` are fine.
    let output = match &sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => Some(ty.clone()),
    };
    let Some(exchange) = args.exchange else {
        cx.error_spanned_by(
            attribute,
            "#[consume] needs the exchange to consume from: #[consume(exchange = \"...\", routing_key = \"...\")]",
        );
        return None;
    };
    let params = params?;
    ok.then(|| {
        HandlerModel::Consume(Consume {
            method: sig.ident.clone(),
            exchange,
            routing_key: args.routing_key.unwrap_or_default(),
            queue: args.queue,
            params,
            output,
        })
    })
}

pub fn publish(
    cx: &Ctxt,
    method: &ImplItemFn,
    args: HandlerArgs,
    attribute: &Attribute,
) -> Option<HandlerModel> {
    let mut ok = check_common(cx, AttrKind::Publish, method, PUBLISH_SIGNATURE);
    let sig = &method.sig;
    match sig.inputs.iter().nth(1) {
        Some(FnArg::Typed(typed))
            if farine_type_name(&typed.ty)
                .is_some_and(|(name, by_ref)| name == "Publisher" && !by_ref) => {}
        Some(other) => {
            cx.error_spanned_by(
                other,
                format!("the first parameter of a #[publish] method is the `farine::Publisher` that farine supplies (callers leave it out): {PUBLISH_SIGNATURE}"),
            );
            ok = false;
        }
        None => {
            cx.error_spanned_by(
                &sig.inputs,
                format!("a #[publish] method takes the `farine::Publisher` that farine supplies: {PUBLISH_SIGNATURE}"),
            );
            ok = false;
        }
    }
    let Some(exchange) = args.exchange else {
        cx.error_spanned_by(
            attribute,
            "#[publish] needs the exchange to publish to: #[publish(exchange = \"...\", routing_key = \"...\")]",
        );
        return None;
    };
    let sent: Vec<&Type> = sig
        .inputs
        .iter()
        .skip(2)
        .filter_map(|input| match input {
            FnArg::Typed(typed) => Some(&*typed.ty),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let payload = match sent[..] {
        [Type::Reference(reference)] => Some(reference.elem.clone()),
        [ty] => Some(Box::new(ty.clone())),
        _ => None,
    }
    // A type that names the method's own generics cannot be named outside it.
    .filter(|ty| sig.generics.params.is_empty() && nameable(ty));
    ok.then(|| {
        HandlerModel::Publish(Publish {
            method: sig.ident.clone(),
            exchange,
            routing_key: args.routing_key.unwrap_or_default(),
            payload,
        })
    })
}

const RPC_METHOD_SIGNATURE: &str = "expected `async fn name(&self, a: A, b: B, ...) -> T` (or `-> Result<T, E>`), where the parameters are `serde::de::DeserializeOwned`, T is `serde::Serialize` and E: Display; or `fn name(&self, ...) -> impl Stream<Item = T>` for a streaming method";

/// The type of `Item = X` in an `impl Stream<Item = X>` return type.
fn stream_item(ty: &Type) -> Option<Option<&Type>> {
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
            return Some(None);
        };
        Some(args.args.iter().find_map(|arg| match arg {
            syn::GenericArgument::AssocType(assoc) if assoc.ident == "Item" => Some(&assoc.ty),
            _ => None,
        }))
    })
}

/// `T` of a type written `Result<T, E>`.
fn result_ok(ty: &Type) -> Option<&Type> {
    match ty {
        Type::Path(path) if path.qself.is_none() => {
            let syn::PathArguments::AngleBracketed(args) = &path.path.segments.last()?.arguments
            else {
                return None;
            };
            args.args.iter().find_map(|arg| match arg {
                syn::GenericArgument::Type(ty) => Some(ty),
                _ => None,
            })
        }
        Type::Group(group) => result_ok(&group.elem),
        Type::Paren(paren) => result_ok(&paren.elem),
        _ => None,
    }
}

/// True when the type can be named outside the method: no `impl Trait`, no `_`.
fn nameable(ty: &Type) -> bool {
    fn clean(tokens: proc_macro2::TokenStream) -> bool {
        tokens.into_iter().all(|token| match token {
            proc_macro2::TokenTree::Ident(ident) => ident != "impl" && ident != "_",
            proc_macro2::TokenTree::Group(group) => clean(group.stream()),
            _ => true,
        })
    }
    clean(quote::ToTokens::to_token_stream(ty))
}

/// What each reply of an RPC method carries, when its signature names it.
fn reply_type(shape: ReplyShape, output: Option<&Type>) -> Option<Type> {
    let found = match (shape, output) {
        (ReplyShape::Value, None) => return Some(syn::parse_quote!(())),
        (ReplyShape::Value, Some(ty)) => ty,
        (ReplyShape::Result, Some(ty)) => result_ok(ty)?,
        (ReplyShape::Stream, Some(ty)) => stream_item(ty).flatten()?,
        (ReplyShape::StreamOfResults, Some(ty)) => result_ok(stream_item(ty).flatten()?)?,
        (_, None) => return None,
    };
    nameable(found).then(|| found.clone())
}

/// True when `ty` is written as a `Result` (`Result<T, E>`, `std::result::Result<..>`).
fn is_result(ty: &Type) -> bool {
    match ty {
        Type::Path(path) if path.qself.is_none() => path
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "Result" && !s.arguments.is_empty()),
        Type::Group(group) => is_result(&group.elem),
        Type::Paren(paren) => is_result(&paren.elem),
        _ => false,
    }
}

pub fn rpc_method(cx: &Ctxt, method: &ImplItemFn, args: HandlerArgs) -> Option<HandlerModel> {
    let sig = &method.sig;
    let mut ok = check_receiver(cx, AttrKind::RpcMethod, method, RPC_METHOD_SIGNATURE);
    if !sig.generics.params.is_empty() {
        cx.error_spanned_by(
            &sig.generics,
            format!("an #[rpc::method] cannot be generic: {RPC_METHOD_SIGNATURE}"),
        );
        ok = false;
    }
    let output = match &sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => Some(ty.clone()),
    };
    let item = output.as_deref().and_then(stream_item);
    let shape = match (item, args.stream) {
        (Some(Some(item)), _) if is_result(item) => ReplyShape::StreamOfResults,
        (Some(_), _) | (None, true) => ReplyShape::Stream,
        (None, false) if output.as_deref().is_some_and(is_result) => ReplyShape::Result,
        (None, false) => ReplyShape::Value,
    };
    let streaming = matches!(shape, ReplyShape::Stream | ReplyShape::StreamOfResults);
    if sig.asyncness.is_none() && !streaming {
        cx.error_spanned_by(
            sig.fn_token,
            format!("an #[rpc::method] must be `async fn` unless it returns a stream: {RPC_METHOD_SIGNATURE}"),
        );
        ok = false;
    }
    let mut params = Vec::new();
    for input in sig.inputs.iter().skip(1) {
        let FnArg::Typed(typed) = input else { continue };
        let syn::Pat::Ident(pat) = &*typed.pat else {
            cx.error_spanned_by(
                &typed.pat,
                "an #[rpc::method] parameter needs a plain name: callers may pass it by name (a keyword argument)",
            );
            ok = false;
            continue;
        };
        if let Type::Reference(reference) = &*typed.ty {
            cx.error_spanned_by(
                reference,
                "an #[rpc::method] argument is decoded into a value the method owns: take `T`, not `&T`",
            );
            ok = false;
            continue;
        }
        params.push((pat.ident.clone(), (*typed.ty).clone()));
    }
    ok.then(|| {
        HandlerModel::RpcMethod(RpcMethod {
            method: sig.ident.clone(),
            is_async: sig.asyncness.is_some(),
            params,
            shape,
            reply: reply_type(shape, output.as_deref()),
            output,
        })
    })
}

const RPC_CLIENT_SIGNATURE: &str = "expected `async fn name(&self, rpc: farine::rpc::Client, ...)` (or a typed client generated by #[rpc::interface])";

pub fn rpc_client(
    cx: &Ctxt,
    method: &ImplItemFn,
    args: HandlerArgs,
    attribute: &Attribute,
) -> Option<HandlerModel> {
    let mut ok = check_common(cx, AttrKind::RpcClient, method, RPC_CLIENT_SIGNATURE);
    if !matches!(method.sig.inputs.iter().nth(1), Some(FnArg::Typed(_))) {
        cx.error_spanned_by(
            &method.sig.inputs,
            format!("an #[rpc::client] method takes the client that farine supplies first: {RPC_CLIENT_SIGNATURE}"),
        );
        ok = false;
    }
    let Some(service) = args.service else {
        cx.error_spanned_by(
            attribute,
            "#[rpc::client] needs the service to call: #[rpc::client(\"service\")]",
        );
        return None;
    };
    ok.then(|| {
        HandlerModel::RpcClient(RpcClient {
            method: method.sig.ident.clone(),
            service,
        })
    })
}

const EXECUTE_SIGNATURE: &str = "expected `async fn name(&self, ...) -> Result<(), E>` (E: Display) or nothing, where each parameter is taken from the run: `farine::Shutdown`, `farine::Db`, or a type that implements `farine::FromCall<farine::execute::Run>`";

fn output_of(sig: &syn::Signature) -> Option<Box<Type>> {
    match &sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => Some(ty.clone()),
    }
}

pub fn execute(cx: &Ctxt, method: &ImplItemFn) -> Option<HandlerModel> {
    let ok = check_common(cx, AttrKind::Execute, method, EXECUTE_SIGNATURE);
    let sig = &method.sig;
    let params = extracted(cx, sig, EXECUTE_SIGNATURE);
    let not_generic = check_not_generic(cx, AttrKind::Execute, sig, EXECUTE_SIGNATURE);
    if !(ok && not_generic) {
        return None;
    }
    Some(HandlerModel::Execute(Execute {
        method: sig.ident.clone(),
        params: params?,
        output: output_of(sig),
    }))
}

const SSE_SIGNATURE: &str = "expected `async fn name(&self, data: T, ...) -> Result<(), E>` (E: Display) or nothing, where each parameter is taken from the event: the data (`String` as it is, any other `serde::Deserialize` type decoded from JSON), `farine::stream::Event`, `EventId`, `EventType`, `farine::Db`, `farine::Shutdown`, or a type that implements `farine::FromCall<farine::stream::Event>`";

pub fn sse(cx: &Ctxt, method: &ImplItemFn) -> Option<HandlerModel> {
    let ok = check_common(cx, AttrKind::StreamHttp, method, SSE_SIGNATURE);
    let sig = &method.sig;
    let params = extracted(cx, sig, SSE_SIGNATURE);
    let not_generic = check_not_generic(cx, AttrKind::StreamHttp, sig, SSE_SIGNATURE);
    if !(ok && not_generic) {
        return None;
    }
    Some(HandlerModel::Sse(Sse {
        method: sig.ident.clone(),
        params: params?,
        output: output_of(sig),
    }))
}
