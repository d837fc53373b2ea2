//! The sans-IO core: deterministic logic shared by the node, the simulator
//! and the client.
//!
//! Invariant: nothing under `core` imports glommio, touches a file or socket,
//! reads the clock or draws from a global RNG. Time and randomness come in as
//! arguments.

pub mod coord;
pub mod partition;
pub mod ring;
pub mod version;
