//! `GET /v2/_catalog?n=&last=`: the repositories the cache holds (not the upstream's), by the
//! names clients use for them, listing only those the client may pull, with `n`/`last`
//! pagination and a `Link` header to the next page.

use std::sync::Arc;

use http::{Response, header};

use crate::access::Caller;
use crate::app::App;
use crate::body::{self, Body};
use crate::error::Error;
use crate::reference::Repository;

/// Largest page answered, whatever `n` asks for.
const MAX_PAGE: usize = 1000;

/// Answers one catalog page.
pub async fn catalog(
    app: &Arc<App>,
    caller: &Caller<'_>,
    host: Option<&str>,
    ns: Option<&str>,
    n: Option<u32>,
    last: Option<String>,
    head: bool,
) -> Result<Response<Body>, Error> {
    let held = app.store.repositories().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot list the cached repositories");
        Vec::new()
    });
    let mut names: Vec<String> = Vec::new();
    for (upstream, repo) in held {
        let Some(i) = app.routing.by_name(&upstream) else {
            continue;
        };
        // The name a client uses for it here: as is on the upstream it is routed to by
        // default (or by `Host`/`ns=`), else under the upstream's name.
        for candidate in [repo.to_string(), format!("{upstream}/{repo}")] {
            let Ok(name) = candidate.parse::<Repository>() else {
                continue;
            };
            let Ok(t) = app.routing.resolve(&name, host, ns) else {
                continue;
            };
            if t.upstream == i && t.repository == repo {
                if caller.may_pull(&t).await {
                    names.push(candidate);
                }
                break;
            }
        }
    }
    names.sort();
    names.dedup();
    let page = paginate(names, n, last.as_deref());
    let payload = serde_json::json!({ "repositories": page.items }).to_string();
    let mut r = body::json(payload, head);
    if let Some(next) = page.next {
        let link = format!("</v2/_catalog?last={next}&n={}>; rel=\"next\"", page.size);
        body::set_header(&mut r, header::LINK, &link);
    }
    Ok(r)
}

struct Page {
    items: Vec<String>,
    size: usize,
    /// The last item, when more follow.
    next: Option<String>,
}

/// The names after `last`, at most `n` of them (sorted input).
fn paginate(names: Vec<String>, n: Option<u32>, last: Option<&str>) -> Page {
    let size = n.map_or(MAX_PAGE, |n| (n as usize).min(MAX_PAGE));
    let mut items: Vec<String> = names
        .into_iter()
        .filter(|x| last.is_none_or(|l| x.as_str() > l))
        .collect();
    let more = items.len() > size;
    items.truncate(size);
    let next = if more { items.last().cloned() } else { None };
    Page { items, size, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pages() {
        let all = names(&["a", "b/c", "d", "e"]);
        let p = paginate(all.clone(), Some(2), None);
        assert_eq!(p.items, names(&["a", "b/c"]));
        assert_eq!(p.next.as_deref(), Some("b/c"));
        let p = paginate(all.clone(), Some(2), Some("b/c"));
        assert_eq!(p.items, names(&["d", "e"]));
        assert_eq!(p.next, None);
        let p = paginate(all.clone(), None, None);
        assert_eq!(p.items.len(), 4);
        let p = paginate(all, Some(0), None);
        assert!(p.items.is_empty());
    }
}
