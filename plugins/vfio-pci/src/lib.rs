//! vfio-pci plugin (see its issue).
