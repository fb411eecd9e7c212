//! Sandbox layers as data: what `sandbox.require` names, what a status line shows.
//!
//! A report holds [`Layer`]s and [`Missing`] layers rather than text, so "is landlock in
//! force?" is a comparison of kinds, never a match on a prefix of a label. Both still
//! travel as their one-line text (in status, and in the SIGUSR2 handover, which an older
//! plugd may have written).

use std::fmt;

macro_rules! layer_kinds {
    ($($(#[$doc:meta])* $variant:ident = $word:literal),+ $(,)?) => {
        /// A kind of sandbox layer.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum LayerKind {
            $($(#[$doc])* $variant),+
        }

        impl LayerKind {
            /// Every kind, in the order a report lists them.
            pub const ALL: &'static [LayerKind] = &[$(LayerKind::$variant),+];

            /// The word a report (and `sandbox.require`) uses.
            pub fn word(self) -> &'static str {
                match self { $(LayerKind::$variant => $word),+ }
            }

            /// The kind a word names.
            pub fn from_word(word: &str) -> Option<LayerKind> {
                match word { $($word => Some(LayerKind::$variant),)+ _ => None }
            }
        }
    };
}

layer_kinds! {
    /// Resource limits (setrlimit).
    Rlimits = "rlimits",
    /// The supervisor's watch of the plugin's resident memory.
    MemoryWatch = "memory-watch",
    /// CPU affinity.
    Cpus = "cpus",
    /// A cgroup v2 of its own.
    Cgroup = "cgroup",
    /// A uid of its own.
    User = "user",
    /// No capabilities, bounding set included.
    NoCapabilities = "no-capabilities",
    /// An unprivileged user namespace (plugd not root).
    Userns = "userns",
    /// A network namespace of its own.
    Netns = "netns",
    /// The namespaces it has of its own.
    Namespaces = "namespaces",
    /// Its root file system.
    Root = "root",
    /// plugd's init as pid 1 of its pid namespace.
    Init = "init",
    /// The whole jail (namespaces and root).
    Jail = "jail",
    /// A seccomp filter.
    Seccomp = "seccomp",
    /// no_new_privs.
    NoNewPrivs = "no-new-privs",
    /// Landlock file rules.
    Landlock = "landlock",
    /// Only the entrypoint may be executed.
    Exec = "exec",
    /// Landlock scopes (signals, abstract unix sockets).
    LandlockScope = "landlock-scope",
    /// An install step's network: none or the host's.
    Network = "network",
}

impl LayerKind {
    /// The kinds `sandbox.require` may name.
    pub const REQUIRABLE: &'static [LayerKind] = &[
        LayerKind::Rlimits,
        LayerKind::Seccomp,
        LayerKind::Netns,
        LayerKind::Landlock,
        LayerKind::Cgroup,
        LayerKind::NoNewPrivs,
        LayerKind::User,
    ];
}

impl serde::Serialize for LayerKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.word())
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// A layer a plugin runs under.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Layer {
    /// Applied by the supervisor, with what it is set to (`landlock(abi 7)`).
    Applied {
        /// Which layer.
        kind: LayerKind,
        /// Its setting, shown in parentheses.
        detail: Option<String>,
    },
    /// Reported by the plugin's own SDK after it started: voluntary, shown as such, and
    /// never counted as a layer plugd enforces.
    Voluntary(String),
    /// A label this plugd does not know (from an older or newer plugd's handover).
    Unknown(String),
}

impl Layer {
    /// A layer the supervisor applies.
    pub fn applied(kind: LayerKind, detail: Option<String>) -> Layer {
        Layer::Applied { kind, detail }
    }

    /// The kind, for a layer the supervisor applies.
    pub fn kind(&self) -> Option<LayerKind> {
        match self {
            Layer::Applied { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

const VOLUNTARY: &str = "(sdk, voluntary)";

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::Applied { kind, detail: None } => write!(f, "{kind}"),
            Layer::Applied { kind, detail: Some(d) } => write!(f, "{kind}({d})"),
            Layer::Voluntary(name) => write!(f, "{name}{VOLUNTARY}"),
            Layer::Unknown(text) => f.write_str(text),
        }
    }
}

impl From<Layer> for String {
    fn from(layer: Layer) -> String {
        layer.to_string()
    }
}

impl From<String> for Layer {
    fn from(text: String) -> Layer {
        if let Some(name) = text.strip_suffix(VOLUNTARY) {
            return Layer::Voluntary(name.to_string());
        }
        let (word, detail) = match text.split_once('(') {
            Some((w, rest)) if rest.ends_with(')') => (w, Some(rest[..rest.len() - 1].to_string())),
            _ => (text.as_str(), None),
        };
        match LayerKind::from_word(word) {
            Some(kind) => Layer::Applied { kind, detail },
            None => Layer::Unknown(text),
        }
    }
}

/// A layer the manifest asked for (or that plugd applies where it can) that this machine
/// cannot provide, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", from = "String")]
pub struct Missing {
    /// Which layer (None for a label this plugd does not know, from a handover).
    pub kind: Option<LayerKind>,
    /// Why it is missing, in words.
    pub why: String,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Some(kind) => write!(f, "{kind}: {}", self.why),
            None => f.write_str(&self.why),
        }
    }
}

impl From<Missing> for String {
    fn from(m: Missing) -> String {
        m.to_string()
    }
}

impl From<String> for Missing {
    fn from(text: String) -> Missing {
        match text.split_once(": ").and_then(|(w, why)| Some((LayerKind::from_word(w)?, why))) {
            Some((kind, why)) => Missing { kind: Some(kind), why: why.to_string() },
            None => Missing { kind: None, why: text },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_read_back_from_their_text() {
        for text in
            ["landlock(abi 7)", "netns", "user(uid 61234)", "init(pid 1: reaps, forwards signals)"]
        {
            let layer = Layer::from(text.to_string());
            assert!(layer.kind().is_some(), "{text}");
            assert_eq!(layer.to_string(), text);
        }
        let v = Layer::from("no-exec(sdk, voluntary)".to_string());
        assert_eq!((v.kind(), v.to_string().as_str()), (None, "no-exec(sdk, voluntary)"));
        // A plugin claiming a layer the supervisor enforces gets no credit for it.
        assert_eq!(Layer::from("landlock(sdk, voluntary)".to_string()).kind(), None);
        let m = Missing::from("cgroup: no delegation".to_string());
        assert_eq!((m.kind, m.why.as_str()), (Some(LayerKind::Cgroup), "no delegation"));
        for kind in LayerKind::ALL {
            assert_eq!(LayerKind::from_word(kind.word()), Some(*kind));
        }
    }
}
