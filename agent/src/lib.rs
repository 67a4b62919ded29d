//! The Wukong disk agent: knows every disk of a Linux guest by its serial, and serves that over gRPC.
//!
//! Data flows one way: [`udev_source`] → [`inventory`] → [`service`]. Kernel state is read under [`roots::HostRoots`]
//! so every parser runs on fixture trees.

pub mod access;
pub mod agent_info;
pub mod config;
pub mod disk;
mod error_chain;
pub mod instance;
pub mod inventory;
pub mod kubevirt;
pub mod limits;
pub mod locate;
pub mod release;
pub mod roots;
pub use wukong_proto::serial;
pub mod server;
pub mod service;
pub mod system;
pub mod tls;
pub mod transport;
pub mod udev_db;
pub mod udev_source;
pub mod usage;
