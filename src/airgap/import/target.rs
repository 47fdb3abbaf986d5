//! Where an `index.json` entry's ref name says it belongs: routed to an upstream tag, or
//! content only.

use crate::airgap::AirgapError;
use crate::airgap::name::{ImageName, NameError};
use crate::airgap::oci::Descriptor;
use crate::reference::{Reference, Repository, Tag};
use crate::rewrite::RoutingTable;

/// Where an `index.json` entry's tag goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTarget {
    /// Upstream name.
    pub upstream: String,
    /// Repository at the upstream.
    pub repository: Repository,
    /// The tag.
    pub tag: Tag,
}

/// Where an `index.json` entry's ref name says it belongs: a tag, or content only (no ref
/// name, or a digest one, which must be the entry's digest).
pub fn target_of(
    entry: &Descriptor,
    table: &RoutingTable,
    repository: Option<&ImageName>,
) -> Result<Option<TagTarget>, AirgapError> {
    let Some(rn) = entry.ref_name() else {
        return Ok(None);
    };
    let bare = !rn.contains(['/', ':', '@']);
    let name: ImageName = if bare {
        let Some(repo) = repository else {
            return Err(AirgapError::Other(format!(
                "ref name {rn:?} is only a tag; say which image it is with --repository NAME"
            )));
        };
        repo.with_tag(rn.parse::<Tag>().map_err(|source| NameError::Parse {
            name: rn.to_owned(),
            source,
        })?)
    } else {
        rn.parse()?
    };
    if !name.has_reference() {
        return Err(AirgapError::Other(format!(
            "ref name {rn:?} has no tag or digest"
        )));
    }
    let r = name.resolve(table)?;
    match r.reference {
        Reference::Tag(tag) => Ok(Some(TagTarget {
            upstream: table.name(r.upstream).to_owned(),
            repository: r.repository,
            tag,
        })),
        Reference::Digest(d) if d == entry.digest => Ok(None),
        Reference::Digest(d) => Err(AirgapError::Corrupt(vec![format!(
            "ref name {rn:?} names {d} but the entry is {}",
            entry.digest
        )])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::airgap::oci;
    use crate::config::Config;
    use crate::media;
    use crate::reference::Digest;

    #[test]
    fn targets_of_ref_names() {
        let t = RoutingTable::new(&Config::default().validate().unwrap());
        let d = Digest::sha256(b"m");
        let entry = |name: Option<&str>| {
            let mut e = Descriptor::named(media::OCI_MANIFEST, d.clone(), 1, "x");
            e.annotations.clear();
            if let Some(n) = name {
                e.annotations.insert(oci::REF_NAME.into(), n.into());
            }
            e
        };
        assert_eq!(target_of(&entry(None), &t, None).unwrap(), None);
        assert_eq!(
            target_of(&entry(Some(&format!("alpine@{d}"))), &t, None).unwrap(),
            None
        );
        let other = Digest::sha256(b"other");
        assert!(target_of(&entry(Some(&format!("alpine@{other}"))), &t, None).is_err());
        let got = target_of(&entry(Some("alpine:3.20")), &t, None)
            .unwrap()
            .unwrap();
        assert_eq!(got.repository.as_str(), "library/alpine");
        assert!(target_of(&entry(Some("library/alpine")), &t, None).is_err());
        assert!(target_of(&entry(Some("quay.io/a/b:1")), &t, None).is_err());
    }
}
