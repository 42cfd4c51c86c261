//! One module per subcommand.

pub mod demo;
pub mod dev_cluster;
pub mod keyslot;
pub mod slots;
