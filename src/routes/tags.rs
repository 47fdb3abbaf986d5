//! `GET /v2/<name>/tags/list`: passed through, or answered from the cached tag answers.

use std::sync::Arc;

use http::{Response, header};

use super::{STALE, Target};
use crate::app::App;
use crate::body::{self, Body, set_header as set};
use crate::error::{Error, Kind, UpstreamError};
use crate::reference::Repository;

/// `GET /v2/<name>/tags/list`, passed through with `n` and `last`; a `Link` to the next page
/// is rewritten to the name the client used.
pub async fn tags(
    app: &Arc<App>,
    target: &Target,
    ns: Option<&str>,
    n: Option<u32>,
    last: Option<String>,
) -> Result<Response<Body>, Error> {
    let repo = target.repository();
    let up = &app.upstreams[target.upstream()];
    let query = {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(n) = n {
            q.append_pair("n", &n.to_string());
        }
        if let Some(l) = &last {
            q.append_pair("last", l);
        }
        q.finish()
    };
    let fetched = if up.offline {
        None
    } else {
        match up.tags(repo, &query).await {
            Ok(answer) => Some(answer),
            // The upstream is unhealthy: answer from what the cache knows, marked stale.
            Err(e) if e.is_unhealthy() => {
                tracing::warn!(error = %e, repository = %repo, stale = true, "tag list from the cache");
                None
            }
            Err(e) => return Err(Error::Upstream(Kind::Tags, e)),
        }
    };
    let Some((body, link)) = fetched else {
        return cached_tags(app, &up.name, repo, n, last.as_deref(), up.offline).await;
    };
    let mut r = body::json(body, false);
    if let Some(link) = link.and_then(|l| next_page_link(&l, &target.name, ns)) {
        set(&mut r, header::LINK, &link);
    }
    Ok(r)
}

/// `tags/list` from the tag answers the cache holds, sorted, with `n`/`last` applied.
async fn cached_tags(
    app: &Arc<App>,
    upstream: &str,
    repo: &Repository,
    n: Option<u32>,
    last: Option<&str>,
    offline: bool,
) -> Result<Response<Body>, Error> {
    let mut tags: Vec<String> = app
        .store
        .tags_of(upstream, repo)
        .await?
        .into_iter()
        .map(|(t, _, _)| t.as_str().to_owned())
        .collect();
    tags.sort();
    tags.dedup();
    if tags.is_empty() {
        return Err(if offline {
            Error::Offline(Kind::Tags)
        } else {
            Error::Upstream(
                Kind::Tags,
                UpstreamError::Unreachable("no cached tags".into()),
            )
        });
    }
    if let Some(l) = last {
        tags.retain(|t| t.as_str() > l);
    }
    if let Some(n) = n {
        tags.truncate(n as usize);
    }
    let payload = serde_json::json!({ "name": repo.as_str(), "tags": tags }).to_string();
    let mut r = body::json(payload, false);
    if !offline {
        r.headers_mut().insert(header::WARNING, STALE);
    }
    Ok(r)
}

/// Rewrites an upstream `Link: <...>; rel="next"` to the name and `ns` the client used. Only
/// the upstream's `n` and `last` parameters are kept, so neither its host nor its repository
/// name reaches the client.
pub fn next_page_link(link: &str, client_name: &Repository, ns: Option<&str>) -> Option<String> {
    let target = link.split_once('<')?.1.split_once('>')?.0;
    let base = url::Url::parse("http://upstream.invalid/").ok()?;
    let url = base.join(target).ok()?;
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url.query_pairs() {
        if k == "n" || k == "last" {
            q.append_pair(&k, &v);
        }
    }
    if let Some(ns) = ns {
        q.append_pair("ns", ns);
    }
    Some(format!(
        "</v2/{client_name}/tags/list?{}>; rel=\"next\"",
        q.finish()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_rewriting() {
        let name: Repository = "up/team/app".parse().unwrap();
        assert_eq!(
            next_page_link(
                "</v2/team/app/tags/list?last=b&n=2>; rel=\"next\"",
                &name,
                None
            )
            .as_deref(),
            Some("</v2/up/team/app/tags/list?last=b&n=2>; rel=\"next\"")
        );
        assert_eq!(
            next_page_link(
                "<https://registry.example/v2/team/app/tags/list?n=2&last=b&x=y>; rel=\"next\"",
                &name,
                Some("docker.io")
            )
            .as_deref(),
            Some("</v2/up/team/app/tags/list?n=2&last=b&ns=docker.io>; rel=\"next\"")
        );
        assert_eq!(next_page_link("garbage", &name, None), None);
    }
}
