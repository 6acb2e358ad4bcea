//! Wires spiffed's stages together.
//!
//! Follows build, then run, then drain: [`config::Config`] is loaded and validated without
//! binding anything; [`build`] opens the CA, indexes the entries and binds the socket, returning
//! a [`Bound`] agent whose socket path tests can read back; [`Bound::run`] serves until the
//! shutdown future completes, then ends every stream, waits up to a grace period for clients to
//! go, and removes the socket.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = spiffed_agent::config::Config::load(std::path::Path::new("spiffed.toml"))?;
//! let bound = spiffed_agent::build(cfg)?;
//! bound.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod admin;
mod agent;
mod agent_mode;
mod bundles;
pub mod config;
mod federation;
mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
mod status;
mod telemetry;

pub use admin::Reloader;
pub use agent::{AgentError, Bound, Stats, build};
pub use files::FilesError;
