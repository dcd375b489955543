//! `licensing-sim`: the **development** licensing server, a simulator of the
//! vendor's CIC server / Voucher Center for local runs, demos and tests. It is not
//! the vendor's server and its licenses are signed with a development key.
//!
//! It serves `proto/comtrexx/vendor/v1/vendor.proto`: the licensing calls a PBX's
//! licensing service makes (`Activate`, `FetchLicense`, `ReportTryout`) and an
//! admin service standing in for the vendor portal ("My devices", vouchers,
//! "Recreate certificate"), plus call counters and faults for tests.
//!
//! - [`state`]: devices and vouchers, the state file and the signing key;
//! - [`server`]: the gRPC services and the server;
//! - [`cli`]: the `licensing-sim` command line (the binary is a thin wrapper).
//!
//! See docs/licensing-server.md.

pub mod cli;
pub mod server;
pub mod state;

pub use server::{Simulator, serve};
pub use state::{Device, SimState, Voucher};
