//! Integration tests: real gateway nodes on port 0, real `docker-registry` backends, real
//! clients (skopeo, podman, ctr). Run through `scripts/test.sh`, which installs the tools.

mod clients;
mod helpers;
mod images;
mod procs;
mod redis_server;
mod registry;
mod servers;

mod admin;
mod cli;
mod cluster;
mod errors;
mod freshness;
mod listing;
mod observability;
mod placement;
mod plan;
mod pulls;
mod secrets;
