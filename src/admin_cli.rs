//! `regatta admin ...`: the admin API from the command line.

use std::time::Duration;

use clap::Subcommand;
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Every backend: health, latency, weight, drain state.
    Backends,
    /// Stop sending traffic to a backend, on every node.
    Drain { id: String },
    /// Send traffic to a drained backend again.
    Undrain { id: String },
    /// Override a backend's weight; `default` returns to the configured one.
    Weight { id: String, weight: String },
    /// Every org policy.
    Orgs,
    /// One org policy.
    Org { name: String },
    /// Create or replace an org policy from a JSON file
    /// (`{"backends": [...], "tag_ttl": "30s", "prefixes": {...}}`).
    PutOrg {
        name: String,
        file: std::path::PathBuf,
    },
    /// Stop serving an org.
    DeleteOrg { name: String },
    /// This node's readiness; `drain` takes this node (only) out of rotation, `undrain`
    /// puts it back.
    Node {
        #[arg(value_enum)]
        action: Option<NodeAction>,
    },
    /// Robot accounts (CI pull credentials): create, list, revoke.
    Robot {
        #[command(subcommand)]
        action: RobotAction,
    },
    /// Forget holders of a digest and/or a repository's tag resolutions, on every node.
    Purge {
        #[arg(long)]
        digest: Option<String>,
        #[arg(long)]
        repository: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum RobotAction {
    /// Creates a robot and prints its secret (shown this once).
    Create {
        name: String,
        /// A repository glob it may pull (`acme/*`); repeat for more.
        #[arg(long = "repository", required = true)]
        repositories: Vec<String>,
        /// How long it works (`90d`); forever when absent.
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Every robot (never their secrets).
    List,
    /// Revokes a robot: its secret and tokens stop working on every node.
    Revoke { name: String },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum NodeAction {
    Drain,
    Undrain,
}

/// Runs one admin command against `url`; returns the text to print or an error message.
pub fn run(url: &str, token: &str, command: AdminCommand) -> Result<String, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    actix_web::rt::System::new().block_on(call(url.trim_end_matches('/'), token, command))
}

async fn call(url: &str, token: &str, command: AdminCommand) -> Result<String, String> {
    use awc::http::Method;
    let (method, path, body): (Method, String, Option<Value>) = match &command {
        AdminCommand::Backends => (Method::GET, "/backends".into(), None),
        AdminCommand::Drain { id } => (Method::POST, format!("/backends/{id}/drain"), None),
        AdminCommand::Undrain { id } => (Method::POST, format!("/backends/{id}/undrain"), None),
        AdminCommand::Weight { id, weight } => {
            let w = if weight == "default" {
                Value::Null
            } else {
                Value::from(
                    weight
                        .parse::<u32>()
                        .map_err(|_| format!("weight '{weight}' is not a number or 'default'"))?,
                )
            };
            (
                Method::PUT,
                format!("/backends/{id}/weight"),
                Some(serde_json::json!({ "weight": w })),
            )
        }
        AdminCommand::Orgs => (Method::GET, "/orgs".into(), None),
        AdminCommand::Org { name } => (Method::GET, format!("/orgs/{name}"), None),
        AdminCommand::PutOrg { name, file } => {
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let policy: Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            (Method::PUT, format!("/orgs/{name}"), Some(policy))
        }
        AdminCommand::DeleteOrg { name } => (Method::DELETE, format!("/orgs/{name}"), None),
        AdminCommand::Node { action: None } => (Method::GET, "/node".into(), None),
        AdminCommand::Node {
            action: Some(NodeAction::Drain),
        } => (Method::POST, "/node/drain".into(), None),
        AdminCommand::Node {
            action: Some(NodeAction::Undrain),
        } => (Method::POST, "/node/undrain".into(), None),
        AdminCommand::Robot {
            action:
                RobotAction::Create {
                    name,
                    repositories,
                    expires_in,
                    description,
                },
        } => (
            Method::POST,
            "/robots".into(),
            Some(serde_json::json!({
                "name": name,
                "repositories": repositories,
                "expires_in": expires_in,
                "description": description,
            })),
        ),
        AdminCommand::Robot {
            action: RobotAction::List,
        } => (Method::GET, "/robots".into(), None),
        AdminCommand::Robot {
            action: RobotAction::Revoke { name },
        } => (Method::DELETE, format!("/robots/{name}"), None),
        AdminCommand::Purge { digest, repository } => (
            Method::POST,
            "/purge".into(),
            Some(serde_json::json!({ "digest": digest, "repository": repository })),
        ),
    };
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish();
    let request = client
        .request(method, format!("{url}/admin/v1{path}"))
        .insert_header(("Authorization", format!("Bearer {token}")));
    let mut response = match body {
        Some(b) => request.send_json(&b).await,
        None => request.send().await,
    }
    .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let bytes = response.body().await.map_err(|e| e.to_string())?;
    let value: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    if !status.is_success() {
        let reason = value["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(format!("{status}: {reason}"));
    }
    Ok(match command {
        AdminCommand::Backends => backends_table(&value),
        AdminCommand::DeleteOrg { name } => format!("org {name} deleted"),
        AdminCommand::Robot {
            action: RobotAction::Revoke { name },
        } => format!("robot {name} revoked"),
        AdminCommand::Robot {
            action: RobotAction::List,
        } => robots_table(&value),
        AdminCommand::Robot {
            action: RobotAction::Create { .. },
        } => format!(
            "robot {} created\nusername: {}\nsecret:   {}\n(the secret is shown only now)",
            value["name"].as_str().unwrap_or(""),
            value["username"].as_str().unwrap_or(""),
            value["secret"].as_str().unwrap_or(""),
        ),
        _ => serde_json::to_string_pretty(&value).unwrap_or_default(),
    })
}

fn robots_table(value: &Value) -> String {
    let mut out = format!(
        "{:<24} {:<8} {:<24} {}\n",
        "USERNAME", "EXPIRED", "EXPIRES", "REPOSITORIES"
    );
    for r in value["robots"].as_array().into_iter().flatten() {
        let expires = r["expires_at_ms"]
            .as_u64()
            .map(|ms| {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                    .to_string()
            })
            .unwrap_or_else(|| "never".into());
        let repos: Vec<&str> = r["repositories"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        out.push_str(&format!(
            "{:<24} {:<8} {:<24} {}\n",
            r["username"].as_str().unwrap_or(""),
            r["expired"].as_bool().unwrap_or(false),
            expires,
            repos.join(","),
        ));
    }
    out
}

fn backends_table(value: &Value) -> String {
    let mut out = format!(
        "{:<16} {:<8} {:<10} {:<8} {:>10} {:>6}  {}\n",
        "BACKEND", "REGION", "STATUS", "DELIVERY", "LATENCY", "WEIGHT", "URL"
    );
    for b in value["backends"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<16} {:<8} {:<10} {:<8} {:>8.1}ms {:>6}  {}\n",
            b["id"].as_str().unwrap_or(""),
            b["region"].as_str().unwrap_or(""),
            b["status"].as_str().unwrap_or(""),
            b["delivery"].as_str().unwrap_or(""),
            b["latency_ms"].as_f64().unwrap_or(0.0),
            b["weight"].as_u64().unwrap_or(0),
            b["url"].as_str().unwrap_or(""),
        ));
    }
    out
}
