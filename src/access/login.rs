//! Authenticating a request's `Authorization`: tokens regcache issued, static bearer tokens,
//! and basic credentials checked against static tokens or bcrypt entries, failed logins counted.

use std::net::IpAddr;

use base64::Engine;
use http::{HeaderMap, header};
use sha2::Digest as _;

use super::{Access, Denied, Identity, Principal, token, unix_now};

/// Compares two digests without an early exit.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Access {
    /// Who the request's `Authorization` says it is. `accept_issued`: whether a token
    /// regcache issued counts (not at the token endpoint, so tokens cannot be renewed
    /// forever). Missing or wrong credentials are `Unauthenticated`; a wrong password or
    /// static token counts as a failed login for `client`, and after too many of them
    /// passwords and static tokens from there are not even checked.
    pub(super) async fn verify(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
        accept_issued: bool,
    ) -> Result<Principal, Denied> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(Denied::Unauthenticated)?;
        let value = value.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            if let Some(claims) = self.signer.verify(rest, unix_now()) {
                if !accept_issued {
                    return Err(Denied::Unauthenticated);
                }
                return Ok(Principal {
                    identity: claims.sub.map_or(Identity::Anonymous, Identity::Named),
                    scope: Some(claims.access),
                });
            }
            if token::looks_issued(rest) {
                // Expired, or signed before a restart: the client fetches a new one.
                return Err(Denied::Unauthenticated);
            }
            self.limiter
                .check(client)
                .map_err(Denied::TooManyFailures)?;
            let hash: [u8; 32] = sha2::Sha256::digest(rest.as_bytes()).into();
            return match self.tokens.get(&hash) {
                Some(name) => Ok(Principal {
                    identity: Identity::Named(name.clone()),
                    scope: None,
                }),
                None => {
                    tracing::info!(client = %client, "client bearer token refused");
                    self.failed_login(client);
                    Err(Denied::Unauthenticated)
                }
            };
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(Denied::Unauthenticated);
        }
        let (user, password) = basic_credentials(rest).ok_or(Denied::Unauthenticated)?;
        self.limiter
            .check(client)
            .map_err(Denied::TooManyFailures)?;
        if self.check_password(&user, password).await {
            return Ok(Principal {
                identity: Identity::Named(user),
                scope: None,
            });
        }
        tracing::info!(user = %user, client = %client, "client authentication failed");
        self.failed_login(client);
        Err(Denied::Unauthenticated)
    }

    pub(super) fn failed_login(&self, client: IpAddr) {
        if self.limiter.fail(client) {
            tracing::warn!(
                client = %client,
                window = ?self.limiter.window(),
                "too many failed logins; refusing logins from this address until the window ends"
            );
        }
    }

    /// Whether `password` is `user`'s: a static token's when `user` names one, otherwise
    /// checked against the htpasswd file.
    pub(super) async fn check_password(&self, user: &str, password: String) -> bool {
        if let Some(want) = self.token_by_name.get(user) {
            let got: [u8; 32] = sha2::Sha256::digest(password.as_bytes()).into();
            return same_digest(&got, want);
        }
        // Keyed with the process's secret, so the table holds no plain password hashes.
        let key = self.signer.mac(format!("{user}:{password}").as_bytes());
        if self.verified.get(&key).is_some_and(|u| u == user) {
            return true;
        }
        if self.failed.contains_key(&key) {
            return false;
        }
        let (known, hash) = match self.users.get(user) {
            Some(h) => (true, h.clone()),
            None => (false, self.dummy_hash.clone().unwrap_or_default()),
        };
        let verified = {
            let Ok(_slot) = self.bcrypt_slots.acquire().await else {
                return false;
            };
            // bcrypt is slow by design: keep it off the async workers.
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false)
        };
        if verified && known {
            self.verified.insert(key, user.to_owned());
            true
        } else {
            self.failed.insert(key, ());
            false
        }
    }
}

/// The user and password of a `Basic` credential (the part after the scheme).
fn basic_credentials(encoded: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}
