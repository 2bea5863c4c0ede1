//! Tags list (with pagination) and referrers (with artifactType filtering).

use crate::helpers::{spawn_app, Config};
use crate::images;
use crate::registry::{Registry, Shape};

#[actix_web::test]
async fn tags_list_paginates_with_the_gateway_name() {
    let registry = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "tags", "1.0", 1, 0);
    for tag in ["1.0", "1.1", "2.0"] {
        registry.push(&image, "acme-images/app", tag);
    }
    let app = spawn_app(&Config::new().backend("hub", &registry, "direct").org(
        "acme",
        &["hub"],
        "30s",
        &[("hub", "acme-images")],
    ))
    .await;
    let all = app.get("/v2/acme/app/tags/list").await;
    assert_eq!(all.status, 200);
    assert_eq!(all.json()["name"], "acme/app");
    assert_eq!(all.json()["tags"], serde_json::json!(["1.0", "1.1", "2.0"]));

    let page = app.get("/v2/acme/app/tags/list?n=2").await;
    assert_eq!(
        page.json()["tags"],
        serde_json::json!(["1.0", "1.1"]),
        "pages are in lexical order"
    );
    let link = page.header("link").expect("a next link");
    assert!(link.starts_with("</v2/acme/app/tags/list?"), "{link}");
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let rest = app.get(next).await;
    assert_eq!(rest.json()["tags"], serde_json::json!(["2.0"]));
}

#[actix_web::test]
async fn referrers_list_the_artifact_and_filter_by_type() {
    let registry = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "referrers", "1.0", 1, 0);
    registry.push(&image, "acme/app", "1.0");
    let subject = image.platform("amd64").manifest.clone();
    let sbom = images::artifact(
        &subject,
        "application/vnd.regatta.test.sbom",
        b"{\"sbom\":true}",
    );
    registry
        .push_artifact("acme/app", &sbom, &subject.digest)
        .await;
    let app = spawn_app(&Config::new().backend("hub", &registry, "direct").org(
        "acme",
        &["hub"],
        "30s",
        &[],
    ))
    .await;

    let answer = app
        .get(&format!("/v2/acme/app/referrers/{}", subject.digest))
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some(images::OCI_INDEX));
    let doc = answer.json();
    assert_eq!(doc["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(doc["manifests"][0]["digest"], sbom.descriptor.digest);
    assert_eq!(
        doc["manifests"][0]["artifactType"],
        "application/vnd.regatta.test.sbom"
    );

    let filtered = app
        .get(&format!(
            "/v2/acme/app/referrers/{}?artifactType=application/vnd.regatta.test.sbom",
            subject.digest
        ))
        .await;
    assert_eq!(filtered.json()["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(filtered.header("oci-filters-applied"), Some("artifactType"));
    let other = app
        .get(&format!(
            "/v2/acme/app/referrers/{}?artifactType=application/other",
            subject.digest
        ))
        .await;
    assert_eq!(other.status, 200);
    assert!(other.json()["manifests"].as_array().unwrap().is_empty());

    // The artifact itself is served by digest, byte-exact.
    let manifest = app
        .get(&format!(
            "/v2/acme/app/manifests/{}",
            sbom.descriptor.digest
        ))
        .await;
    assert_eq!(manifest.status, 200);
    assert_eq!(manifest.body, sbom.manifest);

    // No referrers: an empty index, not a 404.
    let none = app
        .get(&format!(
            "/v2/acme/app/referrers/{}",
            image.platform("arm64").manifest.digest
        ))
        .await;
    assert_eq!(none.status, 200);
    assert!(none.json()["manifests"].as_array().unwrap().is_empty());
}
