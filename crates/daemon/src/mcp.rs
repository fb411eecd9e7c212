//! MCP: the methods of running plugins, as Model Context Protocol tools for agents.
//!
//! With `[mcp] expose = ["bing.*", "calc.add"]` in plugd.toml, `POST /mcp` on the HTTP
//! API speaks MCP's streamable HTTP transport (served by the official SDK, `rmcp`, in
//! its stateless mode: no session to keep, a JSON answer, or Server-Sent Events when a
//! tool streams). The bearer token guards it like every mutating endpoint.
//!
//! - `tools/list` lists, as `plugin.method`, every method of a running plugin that an
//!   `expose` pattern matches, with its description and input schema (from
//!   `plugd.describe`). MCP wants an object as a tool's input: a method whose input is
//!   not an object takes its argument under `input`.
//! - `tools/call` calls it through the daemon's normal path: the schema check, the
//!   plugin's jail and deadlines, restarts, metrics. Pieces a method streams go out as
//!   progress notifications when the client asked for them (`progressToken`). A call's
//!   `cfg` (an API key) rides in the request's `_meta` under `plugd/cfg`.
//! - A tool that no pattern exposes is neither listed nor callable. `expose` is read at
//!   every request, so a reload that changes it applies at once.

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities,
    ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::{
    session::never::NeverSessionManager, StreamableHttpServerConfig, StreamableHttpService,
};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{json, Map, Value};

use crate::control::Secret;
use crate::daemon::Daemon;

/// The `_meta` key of a `tools/call` that carries the call's `cfg`.
pub const CFG_META: &str = "plugd/cfg";

/// `[mcp]` of plugd.toml.
#[derive(Debug, Clone, PartialEq)]
pub struct McpConfig {
    /// Patterns of `plugin.method` to expose: `name.method`, `name.*` or `*`.
    pub expose: Vec<String>,
    /// Host names (beside loopback) MCP clients may address plugd by.
    pub allowed_hosts: Vec<String>,
}

impl McpConfig {
    /// Checks the patterns: each is `plugin.method`, `plugin.*` or `*`.
    pub fn new(expose: Vec<String>, allowed_hosts: Vec<String>) -> Result<McpConfig, String> {
        if expose.is_empty() {
            return Err("`mcp.expose` is empty: list what agents may call, e.g. [\"calc.*\", \"bing.search\"]".into());
        }
        for (i, p) in expose.iter().enumerate() {
            let ok = p == "*"
                || p.split_once('.').is_some_and(|(plugin, method)| {
                    plugin_proto::check_plugin_name(plugin).is_ok()
                        && !method.is_empty()
                        && (method == "*" || tool_name_ok(method))
                });
            if !ok {
                return Err(format!(
                    "`mcp.expose[{i}]` = {p:?} is not `plugin.method`, `plugin.*` or `*`"
                ));
            }
        }
        Ok(McpConfig { expose, allowed_hosts })
    }

    /// Whether `plugin.method` is exposed.
    pub fn exposes(&self, plugin: &str, method: &str) -> bool {
        self.expose.iter().any(|p| {
            p == "*"
                || p.split_once('.')
                    .is_some_and(|(pp, pm)| pp == plugin && (pm == "*" || pm == method))
        })
    }
}

/// Whether `s` may be (part of) an MCP tool name: letters, digits, `_`, `-`, `.`.
fn tool_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The tower service plugd's router mounts at `/mcp`.
pub fn service(
    daemon: Arc<Daemon>,
    listen: std::net::SocketAddr,
) -> StreamableHttpService<Tools, NeverSessionManager> {
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !listen.ip().is_unspecified() {
        hosts.push(listen.ip().to_string());
    }
    hosts.extend(daemon.mcp_config().map(|c| c.allowed_hosts).unwrap_or_default());
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_allowed_hosts(hosts);
    StreamableHttpService::new(
        move || Ok(Tools { daemon: daemon.clone() }),
        Arc::new(NeverSessionManager::default()),
        config,
    )
}

/// The MCP server: plugd's exposed plugin methods as tools.
#[derive(Clone)]
pub struct Tools {
    daemon: Arc<Daemon>,
}

impl Tools {
    /// The exposed tools of the running plugins, and how to call each.
    fn tools(&self) -> Vec<(Tool, Target)> {
        let Some(config) = self.daemon.mcp_config() else { return Vec::new() };
        let mut out = Vec::new();
        for entry in self.daemon.entries(None).unwrap_or_default() {
            if entry.state != "ready" || !tool_name_ok(&entry.name) {
                continue;
            }
            let methods = self.daemon.entries(Some(&entry.name)).unwrap_or_default();
            for m in methods.into_iter().flat_map(|e| e.methods) {
                let Some(method) = m.get("name").and_then(Value::as_str) else { continue };
                if !tool_name_ok(method) || !config.exposes(&entry.name, method) {
                    continue;
                }
                let (schema, wrapped) = input_schema(m.get("input"));
                let description = m.get("description").and_then(Value::as_str).map(str::to_owned);
                let name = format!("{}.{method}", entry.name);
                let mut tool =
                    Tool::new_with_raw(name, description.map(Into::into), Arc::new(schema));
                if let Some(Value::Object(out)) = m.get("output") {
                    if out.get("type").and_then(Value::as_str) == Some("object") {
                        tool = tool.with_raw_output_schema(Arc::new(out.clone()));
                    }
                }
                let target =
                    Target { plugin: entry.name.clone(), method: method.to_owned(), wrapped };
                out.push((tool, target));
            }
        }
        out
    }
}

/// Where a tool's call goes.
struct Target {
    plugin: String,
    method: String,
    /// The method's input is not an object: the tool takes it under `input`.
    wrapped: bool,
}

/// A tool's input schema (an object, as MCP requires) from a method's input schema, and
/// whether the argument is wrapped under `input`.
fn input_schema(input: Option<&Value>) -> (Map<String, Value>, bool) {
    match input {
        Some(Value::Object(s)) if s.get("type").and_then(Value::as_str) == Some("object") => {
            (s.clone(), false)
        }
        Some(schema) => {
            let wrapped = json!({
                "type": "object",
                "properties": { "input": schema },
                "required": ["input"],
            });
            (wrapped.as_object().cloned().unwrap_or_default(), true)
        }
        // Undescribed: any argument, under `input`.
        None => {
            let any = json!({ "type": "object", "properties": { "input": {} } });
            (any.as_object().cloned().unwrap_or_default(), true)
        }
    }
}

impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("plugd", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Tools are methods of plugins that plugd runs in jails, named plugin.method.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools().into_iter().map(|(t, _)| t).collect()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let unknown = || {
            ErrorData::invalid_params(
                format!("no tool named {:?}; tools/list names the exposed ones", request.name),
                None,
            )
        };
        let target = self
            .tools()
            .into_iter()
            .find(|(t, _)| t.name == request.name)
            .map(|(_, target)| target)
            .ok_or_else(unknown)?;
        let args = request.arguments.clone().unwrap_or_default();
        let input = if target.wrapped {
            args.get("input").cloned().unwrap_or(Value::Null)
        } else {
            Value::Object(args)
        };
        let cfg = match context.meta.get(CFG_META) {
            None | Some(Value::Null) => None,
            Some(v) => Some(Secret::new(v.to_string())),
        };
        // Streamed pieces become progress notifications, if the client asked for them.
        let (chunks, forward) = match context.meta.get_progress_token() {
            None => (None, None),
            Some(token) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<supervisor::Payload>();
                let peer = context.peer.clone();
                let forward = tokio::spawn(async move {
                    let mut n = 0.0;
                    while let Some(piece) = rx.recv().await {
                        n += 1.0;
                        let text = String::from_utf8_lossy(&piece.data).into_owned();
                        let note =
                            ProgressNotificationParam::new(token.clone(), n).with_message(text);
                        if peer.notify_progress(note).await.is_err() {
                            break;
                        }
                    }
                });
                (Some(tx), Some(forward))
            }
        };
        let result =
            self.daemon.call(&target.plugin, &target.method, input.to_string(), cfg, chunks).await;
        if let Some(forward) = forward {
            // Every piece is sent before the result (the sender is gone with the call).
            let _ = forward.await;
        }
        Ok(match result {
            Ok(value) => {
                let text = match &value {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
                if value.is_object() {
                    r.structured_content = Some(value);
                }
                r.into()
            }
            // The tool ran (or was refused) and failed: the model sees why.
            Err(e) => CallToolResult::error(vec![ContentBlock::text(e.message)]).into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_expose_what_they_name_and_nothing_else() {
        let c = McpConfig::new(vec!["calc.*".into(), "bing.search".into()], vec![]).unwrap();
        assert!(c.exposes("calc", "add"));
        assert!(c.exposes("bing", "search"));
        assert!(!c.exposes("bing", "news"));
        assert!(!c.exposes("calculator", "add"));
        assert!(McpConfig::new(vec!["*".into()], vec![]).unwrap().exposes("x", "y"));
    }

    #[test]
    fn bad_patterns_are_refused_naming_the_key() {
        assert!(McpConfig::new(vec![], vec![]).unwrap_err().contains("mcp.expose"));
        for bad in ["calc", "calc.", "../x.y", "calc.a b", ".add"] {
            let e = McpConfig::new(vec![bad.into()], vec![]).unwrap_err();
            assert!(e.contains("mcp.expose[0]"), "{bad}: {e}");
        }
    }

    #[test]
    fn inputs_that_are_not_objects_are_wrapped() {
        let (s, wrapped) = input_schema(Some(&json!({"type": "string"})));
        assert!(wrapped);
        assert_eq!(Value::Object(s)["properties"]["input"], json!({"type": "string"}));
        let obj = json!({"type": "object", "properties": {"q": {"type": "string"}}});
        let (s, wrapped) = input_schema(Some(&obj));
        assert!(!wrapped);
        assert_eq!(Value::Object(s), obj);
        let (_, wrapped) = input_schema(None);
        assert!(wrapped);
    }
}
