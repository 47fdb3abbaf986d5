//! Pure wildcard matching for configured patterns (immutable tags, permission rules): `*` is
//! any run of characters (`/` included), `?` exactly one.

/// Matches `text` against `pattern`, where `*` is any run of characters and `?` one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point: linear in practice, no recursion.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn glob_patterns() {
        for (p, t, want) in [
            ("v*.*.*", "v1.2.3", true),
            ("v*.*.*", "v1.2", false),
            ("sha-*", "sha-abc", true),
            ("*", "anything", true),
            ("1.?", "1.2", true),
            ("1.?", "1.23", false),
            ("latest", "latest", true),
            ("latest", "latest2", false),
            ("*-rc*", "1.0-rc1", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("team/*", "team/a/b", true),
            ("", "", true),
            ("", "x", false),
            ("**", "", true),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} {t}");
        }
    }
}
