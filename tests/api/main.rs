//! Integration tests: real gateway nodes on port 0, real `docker-registry` backends, real
//! clients (skopeo, podman, ctr, docker). Run through `scripts/test.sh`, which installs the tools.

mod clients;
mod helpers;
mod images;
mod procs;
mod redis_server;
mod registry;
mod relay;
mod servers;

mod admin;
mod cli;
mod cluster;
mod conformance;
mod deploy;
mod docker;
mod errors;
mod freshness;
mod front;
mod listing;
mod matrix;
mod mirror;
mod multiregion;
mod observability;
mod placement;
mod plan;
mod private;
mod pulls;
mod readiness;
mod regions;
mod robots;
mod secrets;
mod soak;
mod store;
