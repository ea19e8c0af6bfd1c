//! nvdimm plugin (see its issue).
