//! The `scope` of a token request, as the distribution token spec writes it:
//! `repository:acme/app:pull` (`type[(class)]:name:actions`), several per parameter
//! separated by spaces, the parameter repeatable.

use crate::oci::RepoName;

/// Most scope items one token request may ask for.
pub const MAX_SCOPES: usize = 32;
/// Longest single scope item.
const MAX_SCOPE_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// `repository:NAME:ACTIONS` with a valid repository name.
    Repository {
        name: RepoName,
        actions: Vec<String>,
    },
    /// A well-formed scope of another resource type (`registry:catalog:*`): granted
    /// nothing, which is not an error.
    Other(String),
}

/// Every scope item in `values` (each a space-separated list), or what is wrong with one.
pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Vec<Requested>, String> {
    let mut out = Vec::new();
    for value in values {
        for item in value.split(' ').filter(|s| !s.is_empty()) {
            if out.len() == MAX_SCOPES {
                return Err(format!(
                    "too many scopes: at most {MAX_SCOPES} in one token request"
                ));
            }
            out.push(parse_one(item)?);
        }
    }
    Ok(out)
}

fn parse_one(item: &str) -> Result<Requested, String> {
    let shown: String = item.chars().take(80).collect();
    if item.len() > MAX_SCOPE_LEN {
        return Err(format!(
            "scope '{shown}...' is longer than {MAX_SCOPE_LEN} bytes"
        ));
    }
    let malformed = || format!("scope '{shown}' is not type:name:actions");
    let (kind, rest) = item.split_once(':').ok_or_else(malformed)?;
    let (name, actions) = rest.rsplit_once(':').ok_or_else(malformed)?;
    let base_kind = kind
        .split_once('(')
        .map_or(kind, |(k, class)| if class.ends_with(')') { k } else { "" });
    let word = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'*'))
    };
    if !word(base_kind) || name.is_empty() {
        return Err(malformed());
    }
    let actions: Vec<String> = actions.split(',').map(str::to_owned).collect();
    if actions.iter().any(|a| !word(a)) {
        return Err(format!("scope '{shown}' has a malformed action list"));
    }
    if base_kind != "repository" {
        return Ok(Requested::Other(item.to_owned()));
    }
    let name = RepoName::parse(name)
        .map_err(|e| format!("scope '{shown}' names no valid repository: {e}"))?;
    Ok(Requested::Repository { name, actions })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_as_the_spec_writes_them() {
        let got = parse([
            "repository:acme/app:pull,push repository:acme/x:pull",
            "registry:catalog:*",
        ])
        .unwrap();
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Requested::Repository { name, actions }
            if name.as_str() == "acme/app" && actions == &["pull", "push"]));
        assert_eq!(got[2], Requested::Other("registry:catalog:*".into()));
        assert!(matches!(
            &parse(["repository(plugin):acme/app:pull"]).unwrap()[0],
            Requested::Repository { .. }
        ));
        assert!(parse([""]).unwrap().is_empty());
    }

    #[test]
    fn malformed_scopes_are_refused_with_a_reason() {
        for bad in [
            "repository",
            "repository:acme/app",
            "repository:ACME/app:pull",
            "repository:acme/app:",
            ":acme/app:pull",
            "repo sitory:x:pull",
            "repository:acme/app:pu;ll",
        ] {
            assert!(parse([bad]).is_err(), "{bad}");
        }
        let many = vec!["repository:acme/app:pull"; MAX_SCOPES + 1].join(" ");
        assert!(parse([many.as_str()]).unwrap_err().contains("too many"));
        let long = format!("repository:acme/{}:pull", "a".repeat(600));
        assert!(parse([long.as_str()]).unwrap_err().contains("longer"));
    }
}
