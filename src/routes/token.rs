//! `GET /auth/token`, regcache's own token endpoint for Docker-style clients, and the realm
//! a `401` points them at.

use std::sync::Arc;

use http::{HeaderValue, Response, header};

use crate::access::{ClientAddr, TOKEN_PATH};
use crate::app::App;
use crate::body::{self, Body};
use crate::error::Error;

impl App {
    /// The absolute URL of regcache's token endpoint as this client reaches regcache.
    pub(super) fn token_realm(&self, host: Option<&HeaderValue>) -> String {
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let host = host
            .and_then(|v| v.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .map(str::to_owned)
            .unwrap_or_else(|| self.config.listen.to_string());
        format!("{scheme}://{host}{TOKEN_PATH}")
    }

    /// `GET /auth/token`: tokens for Docker-style clients, limited to the scope granted (see
    /// [`Access::issue`]).
    pub(super) async fn token(
        self: &Arc<Self>,
        headers: &http::HeaderMap,
        query: Option<&str>,
        client: Option<ClientAddr>,
    ) -> Result<Response<Body>, Error> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let token = self.access.issue(headers, client, query, host).await?;
        let payload = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": crate::access::TOKEN_LIFETIME.as_secs(),
        })
        .to_string();
        Ok(body::json(payload, false))
    }
}
