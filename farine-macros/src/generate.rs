//! From a checked model to code: the impl block as the user wrote it (with `#[publish]` methods
//! split into the caller-facing method and `<name>_with`), the `Service` impl, and the registry
//! entry. All behaviour lives in the `farine` crate; this only wires calls into it.

use proc_macro2::TokenStream;
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::{
    Attribute, FnArg, ImplItem, ImplItemFn, ItemImpl, Pat, PatIdent, Type, parse_quote,
    punctuated::Punctuated,
};

use crate::attr::{self, CHECKED_MARKER};
use crate::check;
use crate::ctxt::Ctxt;
use crate::model::{
    AttrKind, Consume, Execute, Extracted, HandlerModel, Publish, ReplyShape, RpcClient, RpcMethod,
    ServiceArgs, Sse,
};

/// Expands `#[farine::service]` on `item`.
pub fn service(cx: Ctxt, args: ServiceArgs, mut item: ItemImpl) -> TokenStream {
    if let Some((_, path, _)) = &item.trait_ {
        cx.error_spanned_by(
            path,
            "#[farine::service] goes on the service's own `impl` block (`impl MyService { ... }`), not on a trait impl",
        );
    }
    if !item.generics.params.is_empty() {
        cx.error_spanned_by(&item.generics, "a farine service cannot be generic");
    }
    let type_ident = match &*item.self_ty {
        Type::Path(path) if path.qself.is_none() => {
            path.path.segments.last().map(|s| s.ident.clone())
        }
        _ => None,
    };
    let Some(type_ident) = type_ident else {
        cx.error_spanned_by(
            &item.self_ty,
            "#[farine::service] needs a named struct type",
        );
        return finish_with_errors(cx, item);
    };
    let name = args
        .name
        .as_ref()
        .map(|(name, _)| name.clone())
        .unwrap_or_else(|| type_ident.to_string().to_lowercase());

    let mut handlers: Vec<Handled> = Vec::new();
    for impl_item in &mut item.items {
        let ImplItem::Fn(method) = impl_item else {
            continue;
        };
        let found: Vec<(usize, AttrKind)> = method
            .attrs
            .iter()
            .enumerate()
            .filter_map(|(i, a)| attr::classify(a.path()).map(|kind| (i, kind)))
            .collect();
        let Some(&(index, kind)) = found.first() else {
            continue;
        };
        for (extra, _) in found.iter().skip(1) {
            cx.error_spanned_by(
                &method.attrs[*extra],
                "a method has one farine handler attribute",
            );
        }
        let attribute = method.attrs[index].clone();
        let mut settings = Vec::new();
        let model = match kind {
            AttrKind::Consume | AttrKind::Publish | AttrKind::RpcMethod | AttrKind::RpcClient => {
                let mut parsed = attr::parse_handler_args(&cx, kind, &attribute);
                settings = std::mem::take(&mut parsed.settings);
                match kind {
                    AttrKind::Consume => check::consume(&cx, method, parsed, &attribute),
                    AttrKind::Publish => check::publish(&cx, method, parsed, &attribute),
                    AttrKind::RpcMethod => check::rpc_method(&cx, method, parsed),
                    _ => check::rpc_client(&cx, method, parsed, &attribute),
                }
            }
            AttrKind::Execute | AttrKind::StreamHttp => {
                let marker = attr::is_checked_marker(
                    &attribute
                        .meta
                        .require_list()
                        .map(|l| l.tokens.clone())
                        .unwrap_or_default(),
                );
                if !marker {
                    settings = attr::parse_handler_args(&cx, kind, &attribute).settings;
                }
                if kind == AttrKind::Execute {
                    check::execute(&cx, method)
                } else {
                    check::sse(&cx, method)
                }
            }
        };
        for (position, _) in &found {
            mark_checked(&mut method.attrs[*position]);
        }
        if let Some(model) = model {
            handlers.push((
                model,
                cfg_attrs(&method.attrs),
                signature(&method.sig),
                settings,
            ));
        }
    }
    if let Some(errors) = cx.finish() {
        // The handler attributes are marked, so they expand to nothing: the block compiles
        // and the user sees only these errors.
        return quote!(#item #errors);
    }

    // The delegating impl of the interface, from the RPC methods as written (before the split).
    let interface_impl = args
        .implements
        .as_ref()
        .map(|interface| implement_interface(&item, interface, &handlers));

    // Split each #[publish] and #[rpc::client] method into the caller-facing method, which
    // farine supplies the publisher or client to, and `<name>_with`, which takes it.
    let mut items = Vec::with_capacity(item.items.len());
    for impl_item in std::mem::take(&mut item.items) {
        let ImplItem::Fn(method) = impl_item else {
            items.push(impl_item);
            continue;
        };
        // How the caller-facing method gets what farine supplies, and sends through the
        // runtime's layers: `with_publisher` / `with_rpc_client` look both up at once.
        let injected = handlers.iter().find_map(|(h, ..)| match h {
            HandlerModel::Publish(p) if p.method == method.sig.ident => {
                let name = p.method.to_string();
                Some((
                    quote!(::farine::__private::publisher_and_layers(
                        <Self as ::farine::__private::Service>::NAME, #name
                    )),
                    quote!(<Self as ::farine::__private::Service>::NAME, #name, true),
                ))
            }
            HandlerModel::RpcClient(c) if c.method == method.sig.ident => {
                let (name, target) = (c.method.to_string(), &c.service);
                Some((
                    quote!(::farine::__private::client_and_layers(
                        <Self as ::farine::__private::Service>::NAME, #name, #target
                    )),
                    quote!(<Self as ::farine::__private::Service>::NAME, #name, false),
                ))
            }
            _ => None,
        });
        match injected {
            Some(injected) => {
                let (wrapper, with) = split_injected(method, injected);
                items.push(ImplItem::Fn(wrapper));
                items.push(ImplItem::Fn(with));
            }
            None => items.push(ImplItem::Fn(method)),
        }
    }
    item.items = items;

    let self_ty = &item.self_ty;
    // Pushed one by one, so a handler behind `#[cfg(...)]` is registered only when it exists.
    let handler_pushes = handlers
        .iter()
        .map(|(model, cfgs, (takes, gives), settings)| {
            let handler = match model {
                HandlerModel::Consume(consume) => consume_handler(consume),
                HandlerModel::Publish(publish) => publish_handler(publish),
                HandlerModel::RpcMethod(rpc) => rpc_method_handler(rpc),
                HandlerModel::RpcClient(client) => rpc_client_handler(client),
                HandlerModel::Execute(execute) => execute_handler(execute),
                HandlerModel::Sse(sse) => sse_handler(sse),
            };
            let (keys, values): (Vec<_>, Vec<_>) = settings.iter().cloned().unzip();
            let payloads = payloads(model);
            quote! {
                #(#cfgs)*
                handlers.push(::farine::__private::Handler {
                    takes: #takes,
                    gives: #gives,
                    settings: &[#((#keys, #values)),*],
                    payloads: #payloads,
                    ..#handler
                });
            }
        });
    let build = match &args.init {
        Some(init) => quote! {
            #init(section).map_err(::std::convert::Into::into)
        },
        None => {
            // Only the path carries the type's span (a missing `Default` is reported there);
            // the local names stay call-site, so the code works inside `macro_rules!` too.
            let default =
                quote_spanned! {type_ident.span()=> <Self as ::std::default::Default>::default};
            quote! {
                let _ = section;
                ::std::result::Result::Ok(#default())
            }
        }
    };
    let own_keys = args.init.is_some().then(|| {
        quote!(
            const OWN_KEYS: bool = true;
        )
    });
    let type_name = type_ident.to_string();
    quote! {
        #item

        impl ::farine::__private::Service for #self_ty {
            const NAME: &'static str = #name;

            fn handlers() -> ::std::vec::Vec<::farine::__private::Handler<Self>> {
                let mut handlers = ::std::vec::Vec::new();
                #(#handler_pushes)*
                handlers
            }

            #own_keys

            fn build(
                section: &::farine::config::Section,
            ) -> ::std::result::Result<Self, ::farine::__private::BoxError> {
                #build
            }
        }

        ::farine::__private::inventory::submit! {
            ::farine::__private::ServiceEntry::new::<#self_ty>(#type_name, ::std::module_path!())
        }

        #interface_impl
    }
}

/// How a handler's payloads are described (`farine::__private::PayloadsFn`): for each type
/// its messages carry, its JSON Schema when it implements `schemars::JsonSchema`, else an open
/// schema naming it; asked through `farine::__private::Probe`, so no bound is put on the type.
fn payloads(handler: &HandlerModel) -> TokenStream {
    let probe = |ty: &Type| quote!(::farine::__private::Probe::<#ty>::new());
    let written = |ty: &Type| tidy(&ty.to_token_stream());
    let body = |params: &[Extracted]| {
        let probes = params.iter().map(|Extracted { ty, .. }| {
            let (probe, written) = (probe(ty), written(ty));
            quote! {
                if payloads.body.is_none() {
                    payloads.body = (&&&#probe).body(schemas, #written);
                }
            }
        });
        quote!(#(#probes)*)
    };
    let steps = match handler {
        HandlerModel::Consume(Consume { params, .. }) | HandlerModel::Sse(Sse { params, .. }) => {
            body(params)
        }
        HandlerModel::Publish(Publish {
            payload: Some(ty), ..
        }) => {
            let (probe, written) = (probe(ty), written(ty));
            quote!(payloads.body = ::std::option::Option::Some((&&#probe).sent(schemas, #written));)
        }
        HandlerModel::RpcMethod(rpc) => {
            let arguments = rpc.params.iter().map(|(name, ty)| {
                use syn::ext::IdentExt;
                let name = name.unraw().to_string();
                let (probe, written) = (probe(ty), written(ty));
                quote! {
                    let argument = (&&&#probe)
                        .body(schemas, #written)
                        .unwrap_or(::farine::__private::Payload::Open(#written));
                    payloads.arguments.push((#name, argument));
                }
            });
            let reply = match &rpc.reply {
                Some(ty) => {
                    let (probe, written) = (probe(ty), written(ty));
                    quote!((&&#probe).sent(schemas, #written))
                }
                None => {
                    let written = rpc
                        .output
                        .as_ref()
                        .map_or_else(|| "()".to_string(), |ty| written(ty));
                    quote!(::farine::__private::Payload::Open(#written))
                }
            };
            quote! {
                #(#arguments)*
                payloads.reply = ::std::option::Option::Some(#reply);
            }
        }
        _ => return quote!(::farine::__private::Payloads::none),
    };
    quote! {
        |schemas: &mut ::farine::__private::Schemas| -> ::farine::__private::Payloads {
            #[allow(unused_imports)]
            use ::farine::__private::schema_probe::{
                BodyWithSchema as _, BodyWithoutSchema as _, NotBody as _, SentWithSchema as _,
                SentWithoutSchema as _,
            };
            let mut payloads = ::farine::__private::Payloads::default();
            #steps
            payloads
        }
    }
}

/// A checked handler: its model, its `#[cfg]` attributes, its signature as written (parameters,
/// return type) and the config its attribute carries.
type Handled = (
    HandlerModel,
    Vec<Attribute>,
    (String, String),
    Vec<(String, String)>,
);

/// `impl Interface for Service`, each method delegating to the service's own: the compiler
/// then checks that the service's RPC methods have the interface's exact signatures.
fn implement_interface(
    item: &ItemImpl,
    interface: &syn::Path,
    handlers: &[Handled],
) -> TokenStream {
    let self_ty = &item.self_ty;
    let methods = item.items.iter().filter_map(|impl_item| {
        let ImplItem::Fn(method) = impl_item else {
            return None;
        };
        let rpc = handlers.iter().find_map(|(h, cfgs, ..)| match h {
            HandlerModel::RpcMethod(rpc) if rpc.method == method.sig.ident => Some((rpc, cfgs)),
            _ => None,
        })?;
        let (rpc, cfgs) = rpc;
        let sig = &method.sig;
        let name = &sig.ident;
        let args = rpc.params.iter().map(|(name, _)| name);
        let call = if rpc.is_async {
            quote!(<#self_ty>::#name(self, #(#args),*).await)
        } else {
            quote!(<#self_ty>::#name(self, #(#args),*))
        };
        Some(quote! {
            #(#cfgs)*
            #sig {
                #call
            }
        })
    });
    quote! {
        impl #interface for #self_ty {
            #(#methods)*
        }
    }
}

fn rpc_method_handler(rpc: &RpcMethod) -> TokenStream {
    use syn::spanned::Spanned;
    let RpcMethod {
        method,
        is_async,
        params,
        shape,
        output,
        ..
    } = rpc;
    let name = method.to_string();
    // The wire names: `r#type` is passed as the keyword argument `type`.
    let names = params.iter().map(|(name, _)| {
        use syn::ext::IdentExt;
        name.unraw().to_string()
    });
    let stream = matches!(shape, ReplyShape::Stream | ReplyShape::StreamOfResults);
    let takes = params.iter().enumerate().map(|(index, (_, ty))| {
        let arg = format_ident!("arg{}", index);
        let take = quote_spanned! {ty.span()=> ::farine::__private::RpcArguments::take::<#ty>};
        quote! {
            let #arg = match #take(&mut args, #index) {
                ::std::result::Result::Ok(value) => value,
                ::std::result::Result::Err(error) => return call.fail(error).await,
            };
        }
    });
    let args = (0..params.len()).map(|index| format_ident!("arg{}", index));
    let invoke = if *is_async {
        quote!(<Self>::#method(&*service, #(#args),*).await)
    } else {
        quote!(<Self>::#method(&*service, #(#args),*))
    };
    let reply = match shape {
        ReplyShape::Value => quote!(reply_value),
        ReplyShape::Result => quote!(reply_result),
        ReplyShape::Stream => quote!(reply_stream),
        ReplyShape::StreamOfResults => quote!(reply_stream_results),
    };
    let span = output
        .as_ref()
        .map_or_else(proc_macro2::Span::call_site, |ty| ty.span());
    let reply = quote_spanned! {span=> ::farine::__private::RpcCall::#reply};
    quote! {
        ::farine::__private::Handler {
            name: #name,
            takes: "",
            gives: "",
            settings: &[],
            payloads: ::farine::__private::Payloads::none,
            kind: ::farine::__private::Declared::Rpc(
                ::farine::__private::RpcSpec { stream: #stream },
                |service: ::std::sync::Arc<Self>, mut call: ::farine::__private::RpcCall|
                    -> ::farine::__private::BoxFuture<'static, ()> {
                    ::std::boxed::Box::pin(async move {
                        let mut args = match call.arguments(&[#(#names),*]) {
                            ::std::result::Result::Ok(args) => args,
                            ::std::result::Result::Err(error) => return call.fail(error).await,
                        };
                        #(#takes)*
                        #reply(call, #invoke).await
                    })
                },
            ),
        }
    }
}

/// `<R as IntoOutcome>::into_outcome`, with the return type's span for a wrong return type.
fn into_outcome(output: &Option<Box<syn::Type>>) -> TokenStream {
    match output {
        Some(ty) => {
            use syn::spanned::Spanned;
            quote_spanned! {ty.span()=> <#ty as ::farine::__private::IntoOutcome>::into_outcome}
        }
        None => quote!(<() as ::farine::__private::IntoOutcome>::into_outcome),
    }
}

fn execute_handler(execute: &Execute) -> TokenStream {
    let Execute {
        method,
        params,
        output,
    } = execute;
    let name = method.to_string();
    let (takes, args) = extract(params, &quote!(::farine::execute::Run));
    let into = into_outcome(output);
    quote! {
        ::farine::__private::Handler {
            name: #name,
            takes: "",
            gives: "",
            settings: &[],
            payloads: ::farine::__private::Payloads::none,
            kind: ::farine::__private::Declared::Execute(
                |service: ::std::sync::Arc<Self>, call: ::farine::execute::Run|
                    -> ::farine::__private::BoxFuture<'static, ::farine::__private::Outcome> {
                    ::std::boxed::Box::pin(async move {
                        #takes
                        #into(<Self>::#method(&*service, #(#args),*).await)
                    })
                },
            ),
        }
    }
}

fn sse_handler(sse: &Sse) -> TokenStream {
    let Sse {
        method,
        params,
        output,
    } = sse;
    let name = method.to_string();
    let (takes, args) = extract(params, &quote!(::farine::stream::Event));
    let into = into_outcome(output);
    quote! {
        ::farine::__private::Handler {
            name: #name,
            takes: "",
            gives: "",
            settings: &[],
            payloads: ::farine::__private::Payloads::none,
            kind: ::farine::__private::Declared::Sse(
                |service: ::std::sync::Arc<Self>, call: ::farine::stream::Event|
                    -> ::farine::__private::BoxFuture<'static, ::farine::__private::Outcome> {
                    ::std::boxed::Box::pin(async move {
                        #takes
                        #into(<Self>::#method(&*service, #(#args),*).await)
                    })
                },
            ),
        }
    }
}

/// Takes each parameter from `call` (of type `context`) through `farine::FromCall`, with the
/// parameter type's span, so a type that is neither a body nor an extractor is reported there;
/// a refusal ends the call with its outcome. Returns the statements and the arguments to pass
/// (`&arg` for a parameter taken by reference).
fn extract(params: &[Extracted], context: &TokenStream) -> (TokenStream, Vec<TokenStream>) {
    use syn::spanned::Spanned;
    let mut takes = TokenStream::new();
    let mut args = Vec::new();
    for (index, Extracted { ty, by_ref }) in params.iter().enumerate() {
        let arg = format_ident!("__farine_arg{}", index);
        let from_call =
            quote_spanned! {ty.span()=> <#ty as ::farine::FromCall<#context>>::from_call};
        takes.extend(quote! {
            let #arg = match #from_call(&call) {
                ::std::result::Result::Ok(value) => value,
                ::std::result::Result::Err(rejection) => return rejection.into_outcome(),
            };
        });
        args.push(if *by_ref { quote!(&#arg) } else { quote!(#arg) });
    }
    (takes, args)
}

fn rpc_client_handler(client: &RpcClient) -> TokenStream {
    let name = client.method.to_string();
    let service = &client.service;
    quote! {
        ::farine::__private::Handler {
            name: #name,
            takes: "",
            gives: "",
            settings: &[],
            payloads: ::farine::__private::Payloads::none,
            kind: ::farine::__private::Declared::RpcClient(::farine::__private::RpcClientSpec {
                service: #service,
            }),
        }
    }
}

/// What a method takes (its parameters after `&self`, `name: Type` each) and gives (its return
/// type), as written: the text a handler's description shows.
fn signature(sig: &syn::Signature) -> (String, String) {
    let takes = sig
        .inputs
        .iter()
        .filter_map(|input| match input {
            FnArg::Typed(typed) => Some(format!(
                "{}: {}",
                tidy(&typed.pat.to_token_stream()),
                tidy(&typed.ty.to_token_stream())
            )),
            FnArg::Receiver(_) => None,
        })
        .collect::<Vec<_>>()
        .join(", ");
    let gives = match &sig.output {
        syn::ReturnType::Default => "()".to_string(),
        syn::ReturnType::Type(_, ty) => tidy(&ty.to_token_stream()),
    };
    (takes, gives)
}

/// Tokens as a person writes them: `Map<String, Value>`, not `Map < String , Value >`.
fn tidy(tokens: &TokenStream) -> String {
    let mut text = tokens.to_string();
    for (spaced, tight) in [
        (" < ", "<"),
        ("< ", "<"),
        (" <", "<"),
        (" >", ">"),
        (" , ", ", "),
        (" :: ", "::"),
        (":: ", "::"),
        ("& ", "&"),
        ("( ", "("),
        (" )", ")"),
        ("! ", "!"),
    ] {
        text = text.replace(spaced, tight);
    }
    text
}

/// The `#[cfg]` and `#[cfg_attr]` attributes of a method, which its registration must share.
fn cfg_attrs(attrs: &[Attribute]) -> Vec<Attribute> {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg") || a.path().is_ident("cfg_attr"))
        .cloned()
        .collect()
}

fn finish_with_errors(cx: Ctxt, mut item: ItemImpl) -> TokenStream {
    for impl_item in &mut item.items {
        if let ImplItem::Fn(method) = impl_item {
            for attribute in &mut method.attrs {
                if attr::classify(attribute.path()).is_some() {
                    mark_checked(attribute);
                }
            }
        }
    }
    let errors = cx.finish();
    quote!(#item #errors)
}

/// Keeps the attribute's path as the user wrote it (so their `use` stays used) with the
/// marker as its only argument: the attribute then expands to the method unchanged.
fn mark_checked(attribute: &mut Attribute) {
    let path = attribute.path().clone();
    let marker = format_ident!("{}", CHECKED_MARKER);
    *attribute = parse_quote!(#[#path(#marker)]);
}

fn consume_handler(consume: &Consume) -> TokenStream {
    let Consume {
        method,
        exchange,
        routing_key,
        queue,
        params,
        output,
    } = consume;
    let name = method.to_string();
    let queue = match queue {
        Some(queue) => quote!(::std::option::Option::Some(#queue)),
        None => quote!(::std::option::Option::None),
    };
    let (takes, args) = extract(params, &quote!(::farine::Message));
    let into_outcome = into_outcome(output);
    quote! {
        ::farine::__private::Handler {
            name: #name,
            takes: "",
            gives: "",
            settings: &[],
            payloads: ::farine::__private::Payloads::none,
            kind: ::farine::__private::Declared::Consume(
                ::farine::__private::ConsumeSpec {
                    exchange: #exchange,
                    routing_key: #routing_key,
                    queue: #queue,
                },
                |service: ::std::sync::Arc<Self>, call: ::farine::Message|
                    -> ::farine::__private::BoxFuture<'static, ::farine::__private::Outcome> {
                    ::std::boxed::Box::pin(async move {
                        #takes
                        #into_outcome(<Self>::#method(&*service, #(#args),*).await)
                    })
                },
            ),
        }
    }
}

fn publish_handler(publish: &Publish) -> TokenStream {
    let Publish {
        method,
        exchange,
        routing_key,
        ..
    } = publish;
    let name = method.to_string();
    quote! {
        ::farine::__private::Handler {
            name: #name,
            takes: "",
            gives: "",
            settings: &[],
            payloads: ::farine::__private::Payloads::none,
            kind: ::farine::__private::Declared::Publish(::farine::__private::PublishSpec {
                exchange: #exchange,
                routing_key: #routing_key,
            }),
        }
    }
}

/// `async fn seen(&self, publisher: Publisher, event: &Value) -> R { body }` becomes
/// `async fn seen(&self, event: &Value) -> R` (farine supplies the publisher, `injected`) and
/// `async fn seen_with(&self, publisher: Publisher, event: &Value) -> R { body }`.
fn split_injected(
    original: ImplItemFn,
    injected: (TokenStream, TokenStream),
) -> (ImplItemFn, ImplItemFn) {
    let ident = original.sig.ident.clone();
    let with_ident = format_ident!("{}_with", ident);
    let name = ident.to_string();

    let (docs, others): (Vec<Attribute>, Vec<Attribute>) = original
        .attrs
        .iter()
        .cloned()
        .partition(|a| a.path().is_ident("doc"));

    let mut with = original.clone();
    with.sig.ident = with_ident.clone();
    with.attrs = others
        .iter()
        .filter(|a| attr::classify(a.path()).is_none())
        .cloned()
        .collect();
    let with_doc = format!(
        "[`Self::{name}`] with an explicit publisher (tests, or code outside a running service)."
    );
    with.attrs.insert(0, parse_quote!(#[doc = #with_doc]));

    let mut wrapper = original;
    let cfgs = cfg_attrs(&others);
    wrapper.attrs = docs
        .into_iter()
        .chain(cfgs)
        .chain(
            others
                .into_iter()
                .filter(|a| attr::classify(a.path()).is_some()),
        )
        .collect();
    let mut inputs = Punctuated::new();
    let mut forwarded = Vec::new();
    for (index, input) in wrapper.sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(_) => inputs.push(input.clone()),
            FnArg::Typed(_) if index == 1 => {}
            FnArg::Typed(typed) => {
                let arg = format_ident!("__farine_arg{}", index);
                let mut typed = typed.clone();
                typed.pat = Box::new(Pat::Ident(PatIdent {
                    attrs: Vec::new(),
                    by_ref: None,
                    mutability: None,
                    ident: arg.clone(),
                    subpat: None,
                }));
                inputs.push(FnArg::Typed(typed));
                forwarded.push(arg);
            }
        }
    }
    wrapper.sig.inputs = inputs;
    // Without layers the call is what it was: the `_with` method's future, awaited in place;
    // through layers it is boxed, so that the common case keeps its future small.
    let (supply, send) = injected;
    wrapper.block = parse_quote!({
        let (__farine_injected, __farine_layers) = #supply;
        match __farine_layers {
            ::std::option::Option::None => {
                self.#with_ident(::std::convert::From::from(__farine_injected), #(#forwarded),*)
                    .await
            }
            ::std::option::Option::Some(__farine_layers) => {
                ::std::boxed::Box::pin(::farine::__private::send_through(
                    __farine_layers,
                    #send,
                    self.#with_ident(::std::convert::From::from(__farine_injected), #(#forwarded),*),
                ))
                .await
            }
        }
    });
    (wrapper, with)
}
