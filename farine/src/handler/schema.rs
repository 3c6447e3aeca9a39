//! What a handler's messages look like, as JSON Schema: the body a `#[consume]` handler takes,
//! what a `#[publish]` method sends, an RPC method's arguments and result. `#[farine::service]`
//! asks, for each of those Rust types, whether it implements `schemars::JsonSchema`; a type
//! that does is described by its schema, one that does not by an open schema (any JSON) that
//! names it. The question is asked without a trait bound on the user's types (a probe on
//! references, resolved by method lookup), so a program that never derives `JsonSchema`
//! compiles as before. The AsyncAPI document (`--asyncapi`) is what reads these.

use std::marker::PhantomData;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Where the schemas of named types go in the document, and what `$ref`s point to.
pub const DEFINITIONS: &str = "#/components/schemas/";

/// The schemas of every payload of a document, and the named types they refer to.
pub struct Schemas {
    generator: SchemaGenerator,
}

impl Default for Schemas {
    fn default() -> Self {
        Self::new()
    }
}

impl Schemas {
    /// JSON Schema draft 7 (the dialect AsyncAPI 3.0's default schema format extends), named
    /// types referenced under [`DEFINITIONS`].
    pub fn new() -> Self {
        let settings = SchemaSettings::draft07().with(|settings| {
            settings.definitions_path = DEFINITIONS.trim_start_matches('#').into();
            settings.meta_schema = None;
        });
        Self {
            generator: settings.into_generator(),
        }
    }

    /// The schema of `T`: a `$ref` to its definition for a named type, the schema itself else.
    pub fn of<T: JsonSchema + ?Sized>(&mut self) -> Value {
        let mut schema = self.generator.subschema_for::<T>();
        for transform in self.generator.transforms_mut() {
            transform.transform(&mut schema);
        }
        schema.to_value()
    }

    /// The named types the schemas so far refer to, by name; taken out of the collection.
    pub fn take_definitions(&mut self) -> Map<String, Value> {
        self.generator.take_definitions(true)
    }
}

/// A payload's description.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// The JSON Schema of its Rust type.
    Schema(Value),
    /// Its Rust type (as written) has no JSON Schema: any JSON.
    Open(&'static str),
}

/// What a handler's messages carry, as far as its signature says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Payloads {
    /// The body a `#[consume]` or `#[stream::http]` handler takes, or what a `#[publish]`
    /// method sends (its one parameter after the publisher).
    pub body: Option<Payload>,
    /// An RPC method's arguments, by name, in order.
    pub arguments: Vec<(&'static str, Payload)>,
    /// An RPC method's result (each item, for a stream).
    pub reply: Option<Payload>,
}

impl Payloads {
    /// Nothing known: a handler kind without payloads.
    pub fn none(_: &mut Schemas) -> Payloads {
        Payloads::default()
    }
}

/// How a handler's payloads are described: generated for each handler by `#[farine::service]`.
pub type PayloadsFn = fn(&mut Schemas) -> Payloads;

/// The probe: `(&&&Probe::<T>::new()).body(schemas, "T")` is the schema of a body type that
/// implements `JsonSchema`, an open schema for a body type without one, `None` for a parameter
/// that is not a body (an extractor); `(&&Probe::<T>::new()).sent(schemas, "T")` the schema of
/// a type that is sent. Method lookup tries the impl with the most references first and takes
/// the first whose bounds hold.
pub struct Probe<T: ?Sized>(PhantomData<T>);

impl<T: ?Sized> Probe<T> {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Probe(PhantomData)
    }
}

/// A body with a schema.
pub trait BodyWithSchema {
    fn body(&self, schemas: &mut Schemas, written: &'static str) -> Option<Payload>;
}

impl<T: JsonSchema + DeserializeOwned> BodyWithSchema for &&Probe<T> {
    fn body(&self, schemas: &mut Schemas, _: &'static str) -> Option<Payload> {
        Some(Payload::Schema(schemas.of::<T>()))
    }
}

/// A body without a schema.
pub trait BodyWithoutSchema {
    fn body(&self, schemas: &mut Schemas, written: &'static str) -> Option<Payload>;
}

impl<T: DeserializeOwned> BodyWithoutSchema for &Probe<T> {
    fn body(&self, _: &mut Schemas, written: &'static str) -> Option<Payload> {
        Some(Payload::Open(written))
    }
}

/// Not a body: a parameter taken some other way.
pub trait NotBody {
    fn body(&self, schemas: &mut Schemas, written: &'static str) -> Option<Payload>;
}

impl<T: ?Sized> NotBody for Probe<T> {
    fn body(&self, _: &mut Schemas, _: &'static str) -> Option<Payload> {
        None
    }
}

/// A sent value with a schema.
pub trait SentWithSchema {
    fn sent(&self, schemas: &mut Schemas, written: &'static str) -> Payload;
}

impl<T: JsonSchema + ?Sized> SentWithSchema for &Probe<T> {
    fn sent(&self, schemas: &mut Schemas, _: &'static str) -> Payload {
        Payload::Schema(schemas.of::<T>())
    }
}

/// A sent value without a schema.
pub trait SentWithoutSchema {
    fn sent(&self, schemas: &mut Schemas, written: &'static str) -> Payload;
}

impl<T: ?Sized> SentWithoutSchema for Probe<T> {
    fn sent(&self, _: &mut Schemas, written: &'static str) -> Payload {
        Payload::Open(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct NoSchema {
        #[allow(dead_code)]
        a: u8,
    }

    struct Extractor;

    // The references are the probe: method lookup takes the impl with the most of them first.
    #[allow(clippy::needless_borrow)]
    #[test]
    fn a_body_is_described_by_its_schema_or_an_open_one_and_an_extractor_is_no_body() {
        let mut schemas = Schemas::new();
        assert_eq!(
            (&&&Probe::<i64>::new()).body(&mut schemas, "i64"),
            Some(Payload::Schema(
                serde_json::json!({"type": "integer", "format": "int64"})
            ))
        );
        assert_eq!(
            (&&&Probe::<NoSchema>::new()).body(&mut schemas, "NoSchema"),
            Some(Payload::Open("NoSchema"))
        );
        assert_eq!(
            (&&&Probe::<Extractor>::new()).body(&mut schemas, "Extractor"),
            None
        );
        assert_eq!(
            (&&Probe::<Vec<String>>::new()).sent(&mut schemas, "Vec<String>"),
            Payload::Schema(serde_json::json!({"type": "array", "items": {"type": "string"}}))
        );
        assert_eq!(
            (&&Probe::<Extractor>::new()).sent(&mut schemas, "Extractor"),
            Payload::Open("Extractor")
        );
        assert!(schemas.take_definitions().is_empty());
    }
}
