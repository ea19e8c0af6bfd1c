//! The plugin ABI conformance suite.
