//! The admin API: bearer token required, and every operation in the checked-in OpenAPI
//! description answers as described. Also the `regatta admin` command.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use awc::http::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, Config, ADMIN_TOKEN};
use crate::procs::run;
use crate::registry::{Registry, Shape};

const OPENAPI: &str = include_str!("../../docs/admin-api.openapi.json");
const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Checks that `body` carries the required fields of the schema the document names.
fn check_schema(doc: &Value, response: &Value, body: &Value, what: &str) {
    let Some(reference) = response["content"]["application/json"]["schema"]["$ref"].as_str() else {
        return;
    };
    let name = reference.rsplit('/').next().unwrap();
    let schema = &doc["components"]["schemas"][name];
    for field in schema["required"].as_array().into_iter().flatten() {
        let field = field.as_str().unwrap();
        assert!(
            body.get(field).is_some(),
            "{what}: {name} requires '{field}', body was {body}"
        );
    }
}

#[actix_web::test]
async fn every_documented_admin_call_answers_as_described() {
    let a = Registry::start(Shape::Anonymous, None);
    let b = Registry::start(Shape::Anonymous, None);
    let node = spawn_app(
        &Config::new()
            .admin()
            .backend("a", &a, "direct")
            .backend("b", &b, "direct")
            .org("acme", &["a", "b"], "30s", &[]),
    )
    .await;
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();

    // (operationId, method, path, body, expected status)
    #[rustfmt::skip]
    let calls: Vec<(&str, Method, &str, Option<Value>, u16)> = vec![
        ("getOpenApi", Method::GET, "/admin/v1/openapi.json", None, 200),
        ("listBackends", Method::GET, "/admin/v1/backends", None, 200),
        ("getBackend", Method::GET, "/admin/v1/backends/a", None, 200),
        ("getBackend", Method::GET, "/admin/v1/backends/nope", None, 404),
        ("drainBackend", Method::POST, "/admin/v1/backends/b/drain", None, 200),
        ("drainBackend", Method::POST, "/admin/v1/backends/nope/drain", None, 404),
        ("undrainBackend", Method::POST, "/admin/v1/backends/b/undrain", None, 200),
        ("undrainBackend", Method::POST, "/admin/v1/backends/nope/undrain", None, 404),
        ("setBackendWeight", Method::PUT, "/admin/v1/backends/a/weight", Some(json!({"weight": 5})), 200),
        ("setBackendWeight", Method::PUT, "/admin/v1/backends/a/weight", Some(json!({"weight": null})), 200),
        ("setBackendWeight", Method::PUT, "/admin/v1/backends/a/weight", Some(json!({"weight": "heavy"})), 400),
        ("setBackendWeight", Method::PUT, "/admin/v1/backends/nope/weight", Some(json!({"weight": 1})), 404),
        ("listOrgs", Method::GET, "/admin/v1/orgs", None, 200),
        ("getOrg", Method::GET, "/admin/v1/orgs/acme", None, 200),
        ("getOrg", Method::GET, "/admin/v1/orgs/nope", None, 404),
        ("putOrg", Method::PUT, "/admin/v1/orgs/beta", Some(json!({"backends": ["b"], "tag_ttl": "10s", "prefixes": {"b": "beta-images"}})), 200),
        ("putOrg", Method::PUT, "/admin/v1/orgs/gamma", Some(json!({"backends": ["ghost"]})), 400),
        ("putOrg", Method::PUT, "/admin/v1/orgs/gamma", Some(json!({"backends": ["a"], "tag_ttl": "soon"})), 400),
        ("deleteOrg", Method::DELETE, "/admin/v1/orgs/beta", None, 204),
        ("deleteOrg", Method::DELETE, "/admin/v1/orgs/beta", None, 404),
        ("purge", Method::POST, "/admin/v1/purge", Some(json!({"digest": DIGEST, "repository": "acme/app"})), 200),
        ("purge", Method::POST, "/admin/v1/purge", Some(json!({})), 400),
        ("purge", Method::POST, "/admin/v1/purge", Some(json!({"digest": "md5:x"})), 400),
        ("putOrg", Method::PUT, "/admin/v1/orgs/gamma", Some(json!({"backends": ["a"], "access": "private"})), 400),
        ("createRobot", Method::POST, "/admin/v1/robots", Some(json!({"name": "ci", "repositories": ["acme/*"], "expires_in": "1h"})), 201),
        ("createRobot", Method::POST, "/admin/v1/robots", Some(json!({"name": "ci", "repositories": ["acme/*"]})), 409),
        ("createRobot", Method::POST, "/admin/v1/robots", Some(json!({"name": "Not Valid", "repositories": ["acme/*"]})), 400),
        ("createRobot", Method::POST, "/admin/v1/robots", Some(json!({"name": "x", "repositories": []})), 400),
        ("listRobots", Method::GET, "/admin/v1/robots", None, 200),
        ("revokeRobot", Method::DELETE, "/admin/v1/robots/ci", None, 204),
        ("revokeRobot", Method::DELETE, "/admin/v1/robots/ci", None, 404),
        ("getNode", Method::GET, "/admin/v1/node", None, 200),
        ("drainNode", Method::POST, "/admin/v1/node/drain", None, 200),
        ("undrainNode", Method::POST, "/admin/v1/node/undrain", None, 200),
    ];

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.insert((
                op["operationId"].as_str().unwrap().to_owned(),
                method.to_uppercase(),
                path.clone(),
            ));
        }
    }
    let exercised: BTreeSet<String> = calls.iter().map(|c| c.0.to_owned()).collect();
    for (op, _, _) in &documented {
        assert!(
            exercised.contains(op),
            "the test does not exercise documented operation {op}"
        );
    }

    for (op_id, method, path, body, want) in calls {
        let (_, _, template) = documented
            .iter()
            .find(|(id, m, _)| id == op_id && *m == method.as_str())
            .unwrap_or_else(|| panic!("{op_id} {method} is not documented"));
        let op = &doc["paths"][template.as_str()][method.as_str().to_lowercase()];
        let answer = node.admin(method.clone(), path, body.clone()).await;
        let what = format!("{op_id}: {method} {path}");
        assert_eq!(
            answer.status,
            want,
            "{what}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let response = &op["responses"][want.to_string()];
        assert!(
            response.is_object(),
            "{what}: status {want} is not documented"
        );
        if !answer.body.is_empty() {
            check_schema(&doc, response, &answer.json(), &what);
        }

        let anonymous = node
            .admin_as(method.clone(), path, body.clone(), None)
            .await;
        assert_eq!(anonymous.status, 401, "{what} without a token");
        let wrong = node
            .admin_as(
                method.clone(),
                path,
                body,
                Some("Bearer not-the-token-at-all"),
            )
            .await;
        assert_eq!(wrong.status, 401, "{what} with a wrong token");
    }

    // The changes took effect: the org put and deleted is gone again, weights are back.
    let backends = node
        .admin(Method::GET, "/admin/v1/backends", None)
        .await
        .json();
    assert_eq!(backends["backends"][0]["weight"], 100);
    assert_eq!(node.get("/v2/beta/app/manifests/1.0").await.status, 403);
}

#[actix_web::test]
async fn the_admin_command_drains_and_lists() {
    let a = Registry::start(Shape::Anonymous, None);
    let node = spawn_app(&Config::new().admin().backend("a", &a, "direct").org(
        "acme",
        &["a"],
        "30s",
        &[],
    ))
    .await;
    let admin = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
        cmd.arg("admin")
            .arg("--url")
            .arg(node.admin_url())
            .args(args)
            .env("REGATTA_ADMIN_TOKEN", ADMIN_TOKEN);
        run(cmd, Duration::from_secs(30))
    };
    let out = admin(&["drain", "a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = admin(&["backends"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("a "))
        .unwrap_or_else(|| panic!("no row for a:\n{table}"));
    assert!(row.contains("draining"), "{row}");
    let out = admin(&["drain", "ghost"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
}
