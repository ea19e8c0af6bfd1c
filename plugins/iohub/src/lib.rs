//! iohub plugin (see its issue).
