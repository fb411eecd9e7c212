//! The table of handlers a plugin registers, by method name.

use std::collections::HashMap;
use std::fmt::Display;

use plugin_proto::{CallError, ErrorCode, Payload};
use serde::{de::DeserializeOwned, Serialize};

use crate::Ctx;

type Handler<P> = Box<dyn FnMut(&mut P, &mut Ctx<'_>, &Payload) -> Result<Payload, CallError>>;

/// Handlers by method name, each with typed or raw arguments.
pub struct Methods<P> {
    handlers: Vec<(String, Handler<P>)>,
    /// Where each method's handler is in `handlers`.
    index: HashMap<String, usize>,
    /// The method dispatched last: a call to the same one again (an engine calling
    /// `on_tick` tick after tick) skips hashing its name.
    last: usize,
    /// What `plugd.describe` tells plugd: per method, a description and the JSON Schemas
    /// of its input and result (JSON objects, as text).
    described: std::collections::BTreeMap<String, Described>,
}

/// One method's description for `plugd.describe`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Described {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    /// JSON Schema of the input.
    #[cfg(feature = "schemars")]
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<serde_json::Value>,
    /// JSON Schema of the result.
    #[cfg(feature = "schemars")]
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<serde_json::Value>,
}

impl<P> Default for Methods<P> {
    fn default() -> Self {
        Self { handlers: Vec::new(), index: HashMap::new(), last: 0, described: Default::default() }
    }
}

impl<P> Methods<P> {
    /// Registers a handler whose argument and result are serde types. The
    /// argument is decoded from bincode or JSON, whichever the caller sent,
    /// and the result is encoded the same way.
    pub fn typed<A, R, E, F>(&mut self, method: &str, mut f: F) -> &mut Self
    where
        A: DeserializeOwned,
        R: Serialize,
        E: Display,
        F: FnMut(&mut P, A) -> Result<R, E> + 'static,
    {
        self.with_ctx(method, move |plugin, _ctx, arg| f(plugin, arg))
    }

    /// [`Methods::typed`] for a handler that calls the host through its [`Ctx`]
    /// (`ctx.call("send_order", &order)`, protocol version 2).
    pub fn with_ctx<A, R, E, F>(&mut self, method: &str, mut f: F) -> &mut Self
    where
        A: DeserializeOwned,
        R: Serialize,
        E: Display,
        F: FnMut(&mut P, &mut Ctx<'_>, A) -> Result<R, E> + 'static,
    {
        let name = method.to_string();
        self.insert(
            method,
            Box::new(move |plugin, ctx, payload| {
                let arg: A = payload.decode().map_err(|e| {
                    CallError::new(ErrorCode::BadPayload, format!("method {name}: {e}"))
                })?;
                let out = f(plugin, ctx, arg)
                    .map_err(|e| CallError::new(ErrorCode::Failed, e.to_string()))?;
                payload
                    .encode_like(&out)
                    .map_err(|e| CallError::new(ErrorCode::Internal, format!("method {name}: {e}")))
            }),
        );
        self
    }

    /// Attaches a one-line description to `method` (shown by `plugctl show`, the HTTP API
    /// and MCP's `tools/list`).
    pub fn describe(&mut self, method: &str, description: &str) -> &mut Self {
        let d = self.described.entry(method.to_string()).or_default();
        d.name = method.to_string();
        d.description = Some(description.to_string());
        self
    }

    /// [`Methods::typed`] that also tells plugd what the method takes and gives: a
    /// description and the JSON Schemas of `A` and `R` (from `#[derive(JsonSchema)]`).
    /// plugd then refuses a JSON call whose input does not match, before the plugin sees
    /// it. Needs the `schemars` feature.
    #[cfg(feature = "schemars")]
    pub fn described<A, R, E, F>(&mut self, method: &str, description: &str, f: F) -> &mut Self
    where
        A: DeserializeOwned + schemars::JsonSchema,
        R: Serialize + schemars::JsonSchema,
        E: Display,
        F: FnMut(&mut P, A) -> Result<R, E> + 'static,
    {
        self.typed(method, f);
        self.describe(method, description);
        let d = self.described.entry(method.to_string()).or_default();
        d.input = Some(schema_of::<A>(true));
        d.output = Some(schema_of::<R>(false));
        self
    }

    /// The `plugd.describe` list, if any method is described.
    pub(crate) fn descriptions(&self) -> Vec<Described> {
        self.described.values().filter(|d| self.has(&d.name)).cloned().collect()
    }

    /// Registers a handler that sees the payload as sent and builds its own reply.
    pub fn raw<F>(&mut self, method: &str, mut f: F) -> &mut Self
    where
        F: FnMut(&mut P, &Payload) -> Result<Payload, CallError> + 'static,
    {
        self.insert(method, Box::new(move |plugin, _ctx, payload| f(plugin, payload)));
        self
    }

    /// Registers `handler` under `method`, in place of any before it.
    fn insert(&mut self, method: &str, handler: Handler<P>) {
        match self.index.get(method) {
            Some(&i) => self.handlers[i].1 = handler,
            None => {
                self.index.insert(method.to_string(), self.handlers.len());
                self.handlers.push((method.to_string(), handler));
            }
        }
    }

    /// Whether a handler is registered under `method`.
    pub fn has(&self, method: &str) -> bool {
        self.index.contains_key(method)
    }

    /// Names of all registered methods, sorted (sent in Hello).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    /// Runs the handler for `method`, or answers `UnknownMethod`.
    pub(crate) fn dispatch(
        &mut self,
        plugin: &mut P,
        ctx: &mut Ctx<'_>,
        method: &str,
        payload: &Payload,
    ) -> Result<Payload, CallError> {
        let at = match self.handlers.get(self.last) {
            Some((name, _)) if name == method => Some(self.last),
            _ => self.index.get(method).copied(),
        };
        match at {
            Some(i) => {
                self.last = i;
                (self.handlers[i].1)(plugin, ctx, payload)
            }
            None => Err(CallError::new(
                ErrorCode::UnknownMethod,
                format!("no method {method:?}; this plugin has {:?}", self.names()),
            )),
        }
    }
}

/// `T`'s JSON Schema with every subschema inline (plugd's checker follows no `$ref`),
/// for an input (`deserialize`) or a result.
#[cfg(feature = "schemars")]
fn schema_of<T: schemars::JsonSchema>(deserialize: bool) -> serde_json::Value {
    let settings = schemars::generate::SchemaSettings::draft2020_12().with(|s| {
        s.inline_subschemas = true;
    });
    let settings = if deserialize { settings.for_deserialize() } else { settings.for_serialize() };
    let mut schema = settings.into_generator().into_root_schema_for::<T>().to_value();
    if let Some(obj) = schema.as_object_mut() {
        // Bookkeeping, not shape: plugd shows the rest.
        obj.remove("$schema");
        obj.remove("title");
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Acc(i64);

    fn methods() -> Methods<Acc> {
        let mut m = Methods::default();
        m.typed("add", |a: &mut Acc, x: i64| -> Result<i64, String> {
            a.0 += x;
            Ok(a.0)
        });
        m.typed("fail", |_: &mut Acc, _: ()| -> Result<(), &str> { Err("no luck") });
        m
    }

    /// Runs `method` with a context that makes no host call.
    fn call(
        m: &mut Methods<Acc>,
        acc: &mut Acc,
        method: &str,
        p: &Payload,
    ) -> Result<Payload, CallError> {
        let mut io = crate::ctx::Io::detached();
        let mut ctx = Ctx { io: &mut io, deadline: None, cfg: None, on_ring: false };
        m.dispatch(acc, &mut ctx, method, p)
    }

    #[test]
    fn typed_handler_answers_in_the_callers_codec() {
        let mut m = methods();
        let mut acc = Acc::default();
        let r = call(&mut m, &mut acc, "add", &Payload::bincode(&5i64).unwrap()).unwrap();
        assert_eq!(r.decode::<i64>().unwrap(), 5);
        let r = call(&mut m, &mut acc, "add", &Payload::json(&2i64).unwrap()).unwrap();
        assert_eq!(r.codec, plugin_proto::PayloadCodec::Json);
        assert_eq!(r.data, b"7");
    }

    #[test]
    fn errors_are_classified() {
        let mut m = methods();
        let mut acc = Acc::default();
        let e = call(&mut m, &mut acc, "nope", &Payload::empty()).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownMethod);
        assert!(e.message.contains("add"), "{}", e.message);
        let e = call(&mut m, &mut acc, "add", &Payload::json(&"x").unwrap()).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadPayload);
        let e = call(&mut m, &mut acc, "fail", &Payload::empty()).unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::Failed, "no luck"));
    }

    #[test]
    fn each_call_reaches_its_own_handler_whatever_came_before() {
        let mut m = methods();
        m.typed("sub", |a: &mut Acc, x: i64| -> Result<i64, String> {
            a.0 -= x;
            Ok(a.0)
        });
        let mut acc = Acc::default();
        let one = Payload::bincode(&1i64).unwrap();
        let mut seen = Vec::new();
        for method in ["add", "add", "sub", "add", "nope", "sub", "sub", "add"] {
            seen.push(
                call(&mut m, &mut acc, method, &one).ok().map(|r| r.decode::<i64>().unwrap()),
            );
        }
        assert_eq!(seen, [Some(1), Some(2), Some(1), Some(2), None, Some(1), Some(0), Some(1)]);
        // A handler registered again replaces the one dispatched last.
        m.typed("add", |a: &mut Acc, x: i64| -> Result<i64, String> {
            a.0 += 10 * x;
            Ok(a.0)
        });
        assert_eq!(call(&mut m, &mut acc, "add", &one).unwrap().decode::<i64>().unwrap(), 11);
        assert_eq!(m.names(), ["add", "fail", "sub"]);
        assert!(m.has("sub") && !m.has("nope"));
    }
}
