//! regcache's own bearer tokens and the `scope` parameters clients ask them for. A token is
//! `base64url(claims).base64url(HMAC-SHA256(key, base64url(claims)))`; the claims name the
//! subject (absent: anonymous), the expiry and, like a registry JWT's `access` claim, the
//! repositories (as the client names them) and the actions granted on each.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::Need;
use crate::reference::Repository;

/// Most repository scopes one token request may ask for; further ones are not granted.
pub const MAX_SCOPES: usize = 32;

type HmacSha256 = hmac::Hmac<Sha256>;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The actions granted on one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Always `repository`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Repository name as the client writes it in `/v2/<name>/...`.
    pub name: String,
    /// `pull`, `push`.
    pub actions: Vec<String>,
}

impl Grant {
    /// A repository grant of `actions`.
    pub fn new(name: &Repository, actions: &[Need]) -> Self {
        Grant {
            kind: "repository".into(),
            name: name.to_string(),
            actions: actions.iter().map(|a| a.as_str().to_owned()).collect(),
        }
    }

    /// Whether this grant covers `need` on `name`.
    pub fn covers(&self, name: &Repository, need: Need) -> bool {
        self.kind == "repository"
            && self.name == name.as_str()
            && self.actions.iter().any(|a| a == need.as_str())
    }
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user or token name; `None` for an anonymous token.
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// What the token allows.
    #[serde(default)]
    pub access: Vec<Grant>,
}

/// HMAC-SHA256 of `data` under `key`.
fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Signs and checks tokens with a key that lives as long as the process (or, in a fleet,
/// one derived from the shared peer token).
pub struct Signer {
    key: [u8; 32],
}

impl Signer {
    /// A signer with a fresh random key: a restart invalidates the tokens issued before, and
    /// clients simply fetch new ones.
    pub fn random() -> Self {
        Signer {
            key: rand::random(),
        }
    }

    /// A signer whose key is derived from a secret every replica of a fleet shares (the peer
    /// token), so a token one replica issued is accepted by the others behind a balancer.
    /// The derivation is one-way: a token never reveals the secret.
    pub fn shared(secret: &str) -> Self {
        Signer {
            key: hmac_sha256(secret.as_bytes(), b"regcache client token signing key v1"),
        }
    }

    /// HMAC-SHA256 of `data` under the key.
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.key, data)
    }

    /// The token for `claims`.
    pub fn issue(&self, claims: &Claims) -> String {
        // Serializing plain strings and numbers cannot fail.
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let body = B64.encode(payload);
        format!("{body}.{}", B64.encode(self.mac(body.as_bytes())))
    }

    /// The claims of a token this signer issued that has not expired at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Option<Claims> {
        use hmac::Mac;
        let (body, sig) = token.split_once('.')?;
        let sig = B64.decode(sig).ok()?;
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).ok()?;
        mac.update(body.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&sig).ok()?;
        let claims: Claims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
        (claims.exp >= now).then_some(claims)
    }
}

/// Whether `token` has the shape of a token regcache issues (perhaps expired, or signed
/// before a restart): such tokens are not guesses at a secret, so a failure is not counted
/// as a failed login.
pub fn looks_issued(token: &str) -> bool {
    let Some((body, sig)) = token.split_once('.') else {
        return false;
    };
    B64.decode(sig).is_ok_and(|s| s.len() == 32)
        && B64
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice::<Claims>(&b).ok())
            .is_some()
}

/// The repository scopes of a token request's query (`scope=repository:team/app:pull,push`,
/// repeated or space-separated). Other resource types (`registry:catalog:*`), unknown actions
/// and invalid names are left out; at most [`MAX_SCOPES`] are kept.
pub fn requested_scopes(query: Option<&str>) -> Vec<(Repository, Vec<Need>)> {
    let mut out: Vec<(Repository, Vec<Need>)> = Vec::new();
    let params = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes());
    let scopes = params
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
    for scope in scopes {
        let Some((kind, rest)) = scope.split_once(':') else {
            continue;
        };
        // `repository(plugin)` is a repository too.
        if kind.split('(').next() != Some("repository") {
            continue;
        }
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        let Ok(name) = name.parse::<Repository>() else {
            continue;
        };
        let mut needs = Vec::new();
        for a in actions.split(',') {
            let add: &[Need] = match a.trim() {
                "pull" => &[Need::Pull],
                "push" => &[Need::Push],
                "delete" => &[Need::Delete],
                "*" => &[Need::Pull, Need::Push, Need::Delete],
                _ => &[],
            };
            for n in add {
                if !needs.contains(n) {
                    needs.push(*n);
                }
            }
        }
        if needs.is_empty() {
            continue;
        }
        let full = out.len() >= MAX_SCOPES;
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, existing)) => {
                for n in needs {
                    if !existing.contains(&n) {
                        existing.push(n);
                    }
                }
            }
            None if !full => out.push((name, needs)),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> Repository {
        s.parse().unwrap()
    }

    #[test]
    fn tokens_round_trip_and_refuse_tampering_and_expiry() {
        let s = Signer::random();
        let claims = Claims {
            sub: Some("ci".into()),
            exp: 1000,
            access: vec![Grant::new(&repo("team/app"), &[Need::Pull])],
        };
        let t = s.issue(&claims);
        assert_eq!(s.verify(&t, 999), Some(claims.clone()));
        assert_eq!(s.verify(&t, 1000), Some(claims.clone()));
        assert_eq!(s.verify(&t, 1001), None);
        assert!(looks_issued(&t));
        let (body, _) = t.split_once('.').unwrap();
        assert_eq!(s.verify(&format!("{body}.AAAA"), 0), None);
        // A body with more rights, signed with the old signature.
        let more = Claims {
            access: vec![Grant::new(&repo("team/app"), &[Need::Pull, Need::Push])],
            ..claims
        };
        let forged_body = B64.encode(serde_json::to_vec(&more).unwrap());
        let (_, sig) = t.split_once('.').unwrap();
        assert_eq!(s.verify(&format!("{forged_body}.{sig}"), 0), None);
        assert_eq!(Signer::random().verify(&t, 0), None);
        // Replicas of a fleet derive one key from their shared secret; another secret's
        // tokens are refused.
        let (a, b) = (
            Signer::shared("peer-secret-1"),
            Signer::shared("peer-secret-1"),
        );
        let shared = a.issue(&more);
        assert!(b.verify(&shared, 0).is_some());
        assert_eq!(Signer::shared("peer-secret-2").verify(&shared, 0), None);
        for junk in ["", ".", "garbage", "a.b", "ci-token-1234567890"] {
            assert_eq!(s.verify(junk, 0), None, "{junk}");
            assert!(!looks_issued(junk), "{junk}");
        }
    }

    #[test]
    fn grants_cover_only_their_name_and_actions() {
        let g = Grant::new(&repo("team/app"), &[Need::Pull]);
        assert!(g.covers(&repo("team/app"), Need::Pull));
        assert!(!g.covers(&repo("team/app"), Need::Push));
        assert!(!g.covers(&repo("team/app2"), Need::Pull));
    }

    #[test]
    fn scopes_are_parsed_leniently_and_bounded() {
        let got = requested_scopes(Some(
            "service=regcache&scope=repository:team/app:pull,push&scope=repository:library/alpine:pull%20registry:catalog:*\
             &scope=repository:Bad/Name:pull&scope=repository:x:delete&scope=repository(plugin):p/q:*\
             &scope=repository:team/app:pull&scope=nonsense",
        ));
        assert_eq!(
            got,
            vec![
                (repo("team/app"), vec![Need::Pull, Need::Push]),
                (repo("library/alpine"), vec![Need::Pull]),
                (repo("x"), vec![Need::Delete]),
                (repo("p/q"), vec![Need::Pull, Need::Push, Need::Delete]),
            ]
        );
        assert!(requested_scopes(None).is_empty());
        let many: String = (0..100)
            .map(|i| format!("scope=repository:r{i}:pull&"))
            .collect();
        assert_eq!(requested_scopes(Some(&many)).len(), MAX_SCOPES);
    }
}
