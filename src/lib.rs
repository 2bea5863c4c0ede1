//! regatta: a clustered container-registry gateway. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod admin_cli;
pub mod api_error;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod flights;
pub mod front;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod head_client;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod oci;
pub mod placement;
pub mod readiness;
pub mod route;
pub mod secret;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod upstream;
