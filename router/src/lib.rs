//! shardgate: a sharding query router for PostgreSQL. This crate is the native core;
//! the `shardgate` binary is a thin wrapper around [`cli::main`].

pub mod admin;
pub mod backend;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod deadlock;
pub mod dev;
pub mod error;
pub mod frontend;
pub mod metrics;
pub mod plan;
pub mod plugin;
pub mod protocol;
pub mod server;
pub mod session;
pub mod txn;
