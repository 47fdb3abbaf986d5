//! Pure permission decisions: may this identity pull or push this repository at this
//! upstream, compiled once from `[auth]` (`anonymous_pull`, `push_users`, `[[auth.rule]]`).

use std::collections::HashSet;

use super::{Identity, Need};
use crate::config::{AuthConfig, Permission, RuleConfig, glob_match};

/// One compiled rule.
#[derive(Debug)]
struct Rule {
    anonymous: bool,
    every_user: bool,
    users: HashSet<String>,
    /// Per upstream index: whether one of the rule's upstream patterns matches its name.
    upstreams: Vec<bool>,
    repositories: Vec<String>,
    pull: bool,
    push: bool,
    delete: bool,
}

impl Rule {
    fn new(r: &RuleConfig, upstream_names: &[String]) -> Self {
        Rule {
            anonymous: r.anonymous,
            every_user: r.users.iter().any(|u| u == "*"),
            users: r.users.iter().filter(|u| *u != "*").cloned().collect(),
            upstreams: upstream_names
                .iter()
                .map(|n| r.upstreams.iter().any(|p| glob_match(p, n)))
                .collect(),
            repositories: r.repositories.clone(),
            pull: r.allow.contains(&Permission::Pull),
            push: r.allow.contains(&Permission::Push),
            delete: r.allow.contains(&Permission::Delete),
        }
    }

    fn applies_to(&self, who: &Identity) -> bool {
        match who {
            Identity::Anonymous => self.anonymous,
            Identity::Named(n) => self.every_user || self.users.contains(n),
        }
    }

    fn grants(&self, need: Need, upstream: usize, repository: &str) -> bool {
        let action = match need {
            Need::Pull => self.pull,
            Need::Push => self.push,
            Need::Delete => self.delete,
        };
        action
            && self.upstreams.get(upstream).copied().unwrap_or(false)
            && self.repositories.iter().any(|p| glob_match(p, repository))
    }
}

/// Who may do what, decided without I/O.
#[derive(Debug)]
pub struct Policy {
    push_enabled: bool,
    delete_enabled: bool,
    anonymous_pull: bool,
    /// Without rules: who may push (empty: every named client).
    push_users: HashSet<String>,
    rules: Vec<Rule>,
}

impl Policy {
    /// Compiles a validated `[auth]` section; `upstream_names` in configuration order.
    pub fn new(auth: &AuthConfig, upstream_names: &[String]) -> Self {
        Policy {
            push_enabled: auth.push,
            delete_enabled: auth.delete,
            anonymous_pull: auth.anonymous_pull,
            push_users: auth.push_users.iter().cloned().collect(),
            rules: auth
                .rules
                .iter()
                .map(|r| Rule::new(r, upstream_names))
                .collect(),
        }
    }

    /// Whether deleting through regcache is switched on at all.
    pub fn delete_enabled(&self) -> bool {
        self.delete_enabled
    }

    /// Whether pushing through regcache is switched on at all.
    pub fn push_enabled(&self) -> bool {
        self.push_enabled
    }

    /// Whether anything needs credentials, so `/v2/` must challenge clients without them.
    pub fn challenges(&self) -> bool {
        self.push_enabled || !self.anonymous_pull
    }

    /// Whether anonymous clients may pull anything at all (then the token endpoint hands
    /// them tokens).
    pub fn anonymous_pulls_somewhere(&self) -> bool {
        self.anonymous_pull || self.rules.iter().any(|r| r.anonymous && r.pull)
    }

    /// Whether `who` may do `need` on `repository` (the name at the upstream, after rewriting)
    /// at upstream index `upstream`. Named clients may always do what anonymous ones may.
    pub fn allows(&self, who: &Identity, need: Need, upstream: usize, repository: &str) -> bool {
        if (need == Need::Push && !self.push_enabled)
            || (need == Need::Delete && !self.delete_enabled)
        {
            return false;
        }
        let anonymous = need == Need::Pull
            && (self.anonymous_pull
                || self
                    .rules
                    .iter()
                    .any(|r| r.anonymous && r.grants(need, upstream, repository)));
        match who {
            Identity::Anonymous => anonymous,
            Identity::Named(_) if anonymous => true,
            Identity::Named(name) if self.rules.is_empty() => {
                need == Need::Pull || self.push_users.is_empty() || self.push_users.contains(name)
            }
            Identity::Named(_) => self
                .rules
                .iter()
                .any(|r| r.applies_to(who) && r.grants(need, upstream, repository)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policy(toml: &str) -> Policy {
        let c = Config::from_toml(toml).unwrap();
        let names: Vec<String> = vec!["docker.io".into(), "ghcr".into(), "internal".into()];
        Policy::new(&c.auth, &names)
    }

    fn named(n: &str) -> Identity {
        Identity::Named(n.into())
    }

    #[test]
    fn without_rules_the_old_switches_decide() {
        let p = policy("[auth]\npush = true\npush_users = [\"ci\"]\n");
        assert!(p.allows(&Identity::Anonymous, Need::Pull, 0, "library/alpine"));
        assert!(!p.allows(&Identity::Anonymous, Need::Push, 0, "library/alpine"));
        assert!(p.allows(&named("reader"), Need::Pull, 2, "x/y"));
        assert!(!p.allows(&named("reader"), Need::Push, 2, "x/y"));
        assert!(p.allows(&named("ci"), Need::Push, 2, "x/y"));
        assert!(p.challenges());
        let closed = policy("[auth]\nanonymous_pull = false\n");
        assert!(!closed.allows(&Identity::Anonymous, Need::Pull, 0, "library/alpine"));
        assert!(closed.allows(&named("anyone"), Need::Pull, 0, "library/alpine"));
        assert!(!closed.allows(&named("anyone"), Need::Push, 0, "library/alpine"));
        assert!(!closed.anonymous_pulls_somewhere());
        assert!(!policy("").challenges());
    }

    #[test]
    fn rules_grant_per_upstream_and_repository() {
        let p = policy(
            r#"
[auth]
push = true
anonymous_pull = false
[[auth.rule]]
anonymous = true
upstreams = ["docker.io"]
repositories = ["library/*"]
allow = ["pull"]
[[auth.rule]]
users = ["ci"]
upstreams = ["docker.io", "gh*"]
allow = ["pull"]
[[auth.rule]]
users = ["ci", "release"]
upstreams = ["internal"]
repositories = ["team/*", "tools/??"]
allow = ["pull", "push"]
[[auth.rule]]
users = ["*"]
upstreams = ["internal"]
repositories = ["public/*"]
allow = ["pull"]
"#,
        );
        let anon = Identity::Anonymous;
        let table = [
            // (who, need, upstream, repository, allowed)
            (&anon, Need::Pull, 0, "library/alpine", true),
            (&anon, Need::Pull, 0, "someone/app", false),
            (&anon, Need::Pull, 1, "library/alpine", false),
            (&anon, Need::Push, 0, "library/alpine", false),
            (&named("ci"), Need::Pull, 0, "someone/app", true),
            (&named("ci"), Need::Pull, 1, "org/tool", true),
            (&named("ci"), Need::Push, 1, "org/tool", false),
            (&named("ci"), Need::Pull, 2, "team/app", true),
            (&named("ci"), Need::Push, 2, "team/a/b", true),
            (&named("ci"), Need::Push, 2, "tools/ab", true),
            (&named("ci"), Need::Push, 2, "tools/abc", false),
            (&named("ci"), Need::Push, 2, "other/app", false),
            (&named("release"), Need::Pull, 0, "someone/app", false),
            // Named clients keep what anonymous clients may.
            (&named("release"), Need::Pull, 0, "library/alpine", true),
            (&named("release"), Need::Push, 2, "team/app", true),
            (&named("reader"), Need::Pull, 2, "public/docs", true),
            (&named("reader"), Need::Pull, 2, "team/app", false),
            (&named("reader"), Need::Push, 2, "public/docs", false),
        ];
        for (who, need, up, repo, want) in table {
            assert_eq!(
                p.allows(who, need, up, repo),
                want,
                "{who:?} {need:?} {up} {repo}"
            );
        }
        assert!(p.anonymous_pulls_somewhere());
        assert!(p.challenges());
    }

    #[test]
    fn push_switched_off_wins_over_rules() {
        let mut c = Config::from_toml(
            "[auth]\npush = true\n[[auth.rule]]\nusers = [\"*\"]\nallow = [\"push\"]\n",
        )
        .unwrap();
        c.auth.push = false;
        let p = Policy::new(&c.auth, &["a".to_owned()]);
        assert!(!p.allows(&named("ci"), Need::Push, 0, "x"));
    }
}
