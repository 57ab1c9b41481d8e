//! The meshd node agent (placeholder crate doc; the control helper writes the Layout section).

pub mod engine;
