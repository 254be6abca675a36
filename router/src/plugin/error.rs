//! Errors of loading and calling WebAssembly plugins.

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Not a component, or a component of a world the host does not know.
    #[error("plugin {name} was refused: {reason}")]
    Refused { name: String, reason: String },
    #[error("plugin {name} trapped")]
    Trap { name: String, detail: String },
    #[error("plugin {name} ran past its {limit_ms} ms deadline")]
    Timeout { name: String, limit_ms: u64 },
    #[error("plugin {name} needed more than its {limit_bytes} bytes of memory")]
    OutOfMemory { name: String, limit_bytes: usize },
    /// The plugin answered, but with an error of its own (a value it cannot hash).
    #[error("plugin {name}: {message}")]
    Rejected { name: String, message: String },
    /// The plugin answered something the host does not accept.
    #[error("plugin {name} gave an invalid answer: {reason}")]
    Invalid { name: String, reason: String },
}
