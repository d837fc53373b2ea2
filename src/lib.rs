//! Gyre: a Dynamo-style replicated key-value store built as a thread-per-core
//! storage node.
//!
//! Module map (see ARCHITECTURE.md): [`core`] is sans-IO logic, [`storage`]
//! the per-shard log-structured engine, [`limits`] every hard limit. With
//! the default `node` feature the glommio backend is built; without it the
//! crate stays portable.

pub mod auth;
pub mod client;
pub mod core;
pub mod limits;
#[cfg(feature = "node")]
pub mod node;
pub(crate) mod notify;
#[cfg(feature = "node")]
pub mod shell;
pub mod storage;
pub mod store;
pub mod wire;
