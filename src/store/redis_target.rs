//! Where Redis is and how to reach it: `store.url` parsed into the deployment's shape, its
//! hosts, credentials and TLS, plus the trusted roots (`store.tls_ca`) and the Sentinels' own
//! password (`store.sentinel_password`). Builds the redis crate's clients from them.
//!
//! A password never leaves this module in text: `Display` and `Debug` print the URL with
//! the password as `***`, and so does every parse error.

use std::fmt;

use redis::cluster::ClusterClientBuilder;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisResult, TlsMode};

/// How the Redis deployment is laid out.
#[derive(Clone, PartialEq, Eq)]
pub enum Shape {
    Standalone { db: i64 },
    Sentinel { master: String, db: i64 },
    Cluster,
}

/// A parsed `store.url` with what else it takes to connect.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub shape: Shape,
    /// `rediss` schemes: every connection (Sentinels too) uses TLS.
    pub tls: bool,
    pub hosts: Vec<(String, u16)>,
    username: Option<String>,
    password: Option<String>,
    sentinel_password: Option<String>,
    /// PEM roots trusted for TLS; without them, the webpki (Mozilla) roots.
    tls_ca: Option<Vec<u8>>,
    /// The URL as it may be printed.
    shown: String,
}

const SCHEMES: &str =
    "redis, rediss, redis+sentinel, rediss+sentinel, redis+cluster or rediss+cluster";

impl RedisTarget {
    /// Parses `store.url`. Errors quote the URL with its password redacted.
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        let shown = redact(url);
        let fail = |why: &str| Err(format!("'{shown}' {why}"));
        let Some((scheme, rest)) = url.split_once("://") else {
            return fail(&format!("is not a URL; the scheme is one of {SCHEMES}"));
        };
        let (tls, kind) = match scheme {
            "redis" => (false, ""),
            "rediss" => (true, ""),
            "redis+sentinel" => (false, "sentinel"),
            "rediss+sentinel" => (true, "sentinel"),
            "redis+cluster" => (false, "cluster"),
            "rediss+cluster" => (true, "cluster"),
            other => return fail(&format!("has scheme '{other}', not one of {SCHEMES}")),
        };
        if rest.contains(['?', '#']) {
            return fail(
                "must not carry a query or fragment (TLS is chosen by the rediss scheme, \
                 trusted roots by store.tls_ca)",
            );
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, host_list) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let Some((user, pass)) = u.split_once(':') else {
                    return fail(
                        "names a user without a password: write redis://:password@host or \
                         redis://user:password@host",
                    );
                };
                let user = decode(user).map_err(|e| format!("'{shown}': user {e}"))?;
                let pass = decode(pass).map_err(|e| format!("'{shown}': password {e}"))?;
                if pass.is_empty() {
                    return fail("has an empty password");
                }
                ((!user.is_empty()).then_some(user), Some(pass))
            }
        };
        let default_port = if kind == "sentinel" { 26379 } else { 6379 };
        let mut hosts = Vec::new();
        for h in host_list.split(',') {
            hosts.push(host_port(h, default_port).map_err(|e| format!("'{shown}': {e}"))?);
        }
        let shape = match kind {
            "" => {
                if hosts.len() != 1 {
                    return fail("names several hosts: use redis+sentinel:// or redis+cluster://");
                }
                Shape::Standalone {
                    db: db_number(path).map_err(|e| format!("'{shown}': {e}"))?,
                }
            }
            "sentinel" => {
                let (master, db) = path.split_once('/').unwrap_or((path, ""));
                if master.is_empty() {
                    return fail("needs the master name: redis+sentinel://host:port,.../master");
                }
                Shape::Sentinel {
                    master: master.to_owned(),
                    db: db_number(db).map_err(|e| format!("'{shown}': {e}"))?,
                }
            }
            _ => {
                if !path.is_empty() {
                    return fail("has a path, but a cluster has only database 0");
                }
                Shape::Cluster
            }
        };
        Ok(RedisTarget {
            shape,
            tls,
            hosts,
            username,
            password,
            sentinel_password: None,
            tls_ca: None,
            shown,
        })
    }

    /// Trusts the certificates of the PEM bundle `pem` (and no others) for TLS.
    pub fn with_tls_ca(mut self, pem: Vec<u8>) -> Result<RedisTarget, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
        if certs.is_empty() {
            return Err("holds no PEM certificate".into());
        }
        if !self.tls {
            return Err(format!(
                "is set, but '{}' does not use TLS (rediss schemes do)",
                self.shown
            ));
        }
        self.tls_ca = Some(pem);
        Ok(self)
    }

    /// The password the Sentinels themselves require (`requirepass` on the Sentinels).
    pub fn with_sentinel_password(mut self, password: String) -> Result<RedisTarget, String> {
        if !matches!(self.shape, Shape::Sentinel { .. }) {
            return Err(format!(
                "is set, but '{}' is not a Sentinel URL",
                self.shown
            ));
        }
        self.sentinel_password = Some(password);
        Ok(self)
    }

    fn tls_certificates(&self) -> Option<redis::TlsCertificates> {
        self.tls_ca.as_ref().map(|pem| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        })
    }

    fn addr(&self, (host, port): &(String, u16)) -> ConnectionAddr {
        if self.tls {
            ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.clone(), *port)
        }
    }

    fn redis_settings(&self, db: i64) -> RedisConnectionInfo {
        let mut settings = RedisConnectionInfo::default().set_db(db);
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        settings
    }

    /// A client for a standalone server.
    pub fn client(&self) -> RedisResult<redis::Client> {
        let Shape::Standalone { db } = self.shape else {
            unreachable!("only called for standalone targets")
        };
        let info = self
            .addr(&self.hosts[0])
            .into_connection_info()?
            .set_redis_settings(self.redis_settings(db));
        match self.tls_certificates() {
            Some(certs) => redis::Client::build_with_tls(info, certs),
            None => redis::Client::open(info),
        }
    }

    /// A client that asks the Sentinels for the current master.
    pub fn sentinel(&self) -> RedisResult<SentinelClient> {
        let Shape::Sentinel { master, db } = &self.shape else {
            unreachable!("only called for Sentinel targets")
        };
        let mut builder = SentinelClientBuilder::new(
            self.hosts.iter().map(|h| self.addr(h)),
            master,
            SentinelServerType::Master,
        )?
        .set_client_to_redis_db(*db);
        if let Some(user) = &self.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = &self.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(password) = &self.sentinel_password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        if self.tls {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
            if let Some(certs) = self.tls_certificates() {
                builder = builder
                    .set_client_to_redis_certificates(certs.clone())
                    .set_client_to_sentinel_certificates(certs);
            }
        }
        builder.build()
    }

    /// A builder for a Cluster client seeded with every listed node.
    pub fn cluster(&self) -> RedisResult<ClusterClientBuilder> {
        let mut nodes = Vec::new();
        for h in &self.hosts {
            nodes.push(
                self.addr(h)
                    .into_connection_info()?
                    .set_redis_settings(self.redis_settings(0)),
            );
        }
        let mut builder = ClusterClientBuilder::new(nodes);
        if let Some(user) = &self.username {
            builder = builder.username(user);
        }
        if let Some(password) = &self.password {
            builder = builder.password(password.clone());
        }
        if self.tls {
            builder = builder.tls(TlsMode::Secure);
            if let Some(certs) = self.tls_certificates() {
                builder = builder.certs(certs);
            }
        }
        Ok(builder)
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.shown)
            .field("tls_ca", &self.tls_ca.as_ref().map(|_| "<set>"))
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// A Redis URL as it may be printed: the password, if any, replaced by `***`. Works on
/// URLs that do not parse too, so error messages never show one.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL: it may still hold `user:password@host`.
        return match url.rsplit_once('@') {
            Some(_) => "***".into(),
            None => url.to_owned(),
        };
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{hosts}{tail}")
        }
        None => url.to_owned(),
    }
}

fn decode(part: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| "is not UTF-8 after percent-decoding".to_owned())
}

fn host_port(text: &str, default_port: u16) -> Result<(String, u16), String> {
    if text.is_empty() {
        return Err("names an empty host".into());
    }
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("host '{text}' has no closing ']'"))?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(format!("host '{text}' is not [address]:port")),
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(format!("host '{text}' is not host:port"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("port '{p}' of '{text}' is not a port number")),
        },
    };
    Ok((host.to_owned(), port))
}

fn db_number(path: &str) -> Result<i64, String> {
    let path = path.trim_end_matches('/');
    if path.is_empty() {
        return Ok(0);
    }
    path.parse::<u16>()
        .map(i64::from)
        .map_err(|_| format!("'{path}' is not a database number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_shape() {
        let t = RedisTarget::parse("redis://127.0.0.1:6379/2").unwrap();
        assert!(t.shape == Shape::Standalone { db: 2 } && !t.tls);
        assert_eq!(t.hosts, [("127.0.0.1".to_owned(), 6379)]);

        let t = RedisTarget::parse("rediss://:p%40ss@cache.internal").unwrap();
        assert!(t.tls && t.shape == Shape::Standalone { db: 0 });
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert_eq!(t.hosts, [("cache.internal".to_owned(), 6379)]);

        let t = RedisTarget::parse("rediss+sentinel://app:pw@a:26380,b/main/1").unwrap();
        assert!(
            t.tls
                && t.shape
                    == Shape::Sentinel {
                        master: "main".into(),
                        db: 1
                    }
        );
        assert_eq!(t.username.as_deref(), Some("app"));
        assert_eq!(
            t.hosts,
            [("a".to_owned(), 26380), ("b".to_owned(), 26379)],
            "Sentinels default to port 26379"
        );

        let t = RedisTarget::parse("redis+cluster://:pw@[::1]:7000,10.0.0.2:7001").unwrap();
        assert!(t.shape == Shape::Cluster && !t.tls);
        assert_eq!(
            t.hosts,
            [("::1".to_owned(), 7000), ("10.0.0.2".to_owned(), 7001)]
        );
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for (url, says) in [
            ("localhost:6379", "scheme"),
            ("http://x", "scheme 'http'"),
            ("redis+sentinel://a:26379", "master name"),
            ("redis+sentinel://a:26379/", "master name"),
            ("redis://a:1,b:2", "several hosts"),
            ("redis+cluster://a:1/0", "database 0"),
            ("redis://a:99999", "port"),
            ("redis://a/x", "database number"),
            ("rediss://a/#insecure", "fragment"),
            ("redis://a?protocol=resp3", "query"),
            ("redis://user@a", "without a password"),
            ("redis://:@a", "empty password"),
            ("redis+cluster://a,,b", "empty host"),
        ] {
            let err = RedisTarget::parse(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn passwords_are_never_printed() {
        let secret = "s3cr%2Ft";
        for url in [
            format!("redis://:{secret}@h:6379/0"),
            format!("rediss+sentinel://u:{secret}@a,b/m"),
            format!("redis+cluster://:{secret}@a:1,b:2"),
            // Broken ones too: the error quotes the URL.
            format!("redis://:{secret}@h:notaport"),
            format!("redis+sentinel://:{secret}@a"),
            format!("ftp://:{secret}@h"),
        ] {
            let shown = match RedisTarget::parse(&url) {
                Ok(t) => format!("{t} {t:?}"),
                Err(e) => e,
            };
            assert!(!shown.contains("s3cr"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact("rediss://app:pw@h/0"), "rediss://app:***@h/0");
        assert_eq!(redact("garbage:pw@h"), "***");
        let with = RedisTarget::parse("redis+sentinel://a/m")
            .unwrap()
            .with_sentinel_password("topsecret".into())
            .unwrap();
        assert!(!format!("{with:?}").contains("topsecret"));
    }

    #[test]
    fn options_fit_the_url() {
        let plain = RedisTarget::parse("redis://h").unwrap();
        let err = plain.clone().with_tls_ca(b"not pem".to_vec()).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
        assert!(plain
            .with_sentinel_password("x".into())
            .unwrap_err()
            .contains("not a Sentinel URL"));
    }
}
