//! The table of handlers a plugin registers, by method name.

use std::collections::HashMap;
use std::fmt::Display;

use plugin_proto::{CallError, ErrorCode, Payload};
use serde::{de::DeserializeOwned, Serialize};

use crate::Ctx;

type Handler<P> = Box<dyn FnMut(&mut P, &mut Ctx<'_>, &Payload) -> Result<Payload, CallError>>;

/// Handlers by method name, each with typed or raw arguments.
pub struct Methods<P> {
    handlers: HashMap<String, Handler<P>>,
}

impl<P> Default for Methods<P> {
    fn default() -> Self {
        Self { handlers: HashMap::new() }
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
        self.handlers.insert(
            method.to_string(),
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

    /// Registers a handler that sees the payload as sent and builds its own reply.
    pub fn raw<F>(&mut self, method: &str, mut f: F) -> &mut Self
    where
        F: FnMut(&mut P, &Payload) -> Result<Payload, CallError> + 'static,
    {
        self.handlers
            .insert(method.to_string(), Box::new(move |plugin, _ctx, payload| f(plugin, payload)));
        self
    }

    /// Whether a handler is registered under `method`.
    pub fn has(&self, method: &str) -> bool {
        self.handlers.contains_key(method)
    }

    /// Names of all registered methods, sorted (sent in Hello).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.handlers.keys().cloned().collect();
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
        match self.handlers.get_mut(method) {
            Some(h) => h(plugin, ctx, payload),
            None => Err(CallError::new(
                ErrorCode::UnknownMethod,
                format!("no method {method:?}; this plugin has {:?}", self.names()),
            )),
        }
    }
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
        let mut ctx = Ctx { io: &mut io, deadline: None, cfg: None };
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
}
