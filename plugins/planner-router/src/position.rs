//! `position(a IN b)`, which the SQL parser accepts in expressions but not as a table
//! function in FROM (`FROM t, position('om' in 'Thomas')`), written the way Postgres's
//! own grammar turns it into a function call: `pg_catalog.position(b, a)`. The result
//! column keeps the name `position` (Postgres names it after the function's last name
//! part). Used only when the statement as written does not parse.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

/// The text with every `position(a IN b)` rewritten, or `None` when it has none (or does
/// not tokenize).
pub(crate) fn rewrite(sql: &str) -> Option<String> {
    if !sql.to_ascii_lowercase().contains("position") {
        return None;
    }
    let mut text = sql.to_owned();
    let mut changed = false;
    // One occurrence per pass (offsets move); a rewritten one is schema-qualified and is
    // not matched again. Nested ones are reached from the outside in.
    for _ in 0..64 {
        match rewrite_first(&text) {
            Some(t) => {
                text = t;
                changed = true;
            }
            None => break,
        }
    }
    changed.then_some(text)
}

fn is_word(t: &Token, w: &str) -> bool {
    matches!(t, Token::Word(x) if x.quote_style.is_none() && x.value.eq_ignore_ascii_case(w))
}

fn rewrite_first(sql: &str) -> Option<String> {
    let toks = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    let offset = offsets(sql);
    let at = |l: Location| offset(l.line, l.column);
    let solid: Vec<&TokenWithSpan> = toks
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .collect();
    for i in 0..solid.len() {
        if !is_word(&solid[i].token, "position")
            || !matches!(solid.get(i + 1).map(|t| &t.token), Some(Token::LParen))
            || (i > 0 && matches!(solid[i - 1].token, Token::Period))
        {
            continue;
        }
        let mut depth = 0usize;
        let mut in_at: Option<usize> = None;
        for j in i + 1..solid.len() {
            match &solid[j].token {
                Token::LParen | Token::LBracket => depth += 1,
                Token::RParen | Token::RBracket => {
                    depth -= 1;
                    if depth == 0 {
                        let k = in_at?;
                        let start = at(solid[i].span.start)?;
                        let open = at(solid[i + 1].span.end)?;
                        let (in_start, in_end) = (at(solid[k].span.start)?, at(solid[k].span.end)?);
                        let close = at(solid[j].span.start)?;
                        let end = at(solid[j].span.end)?;
                        let (a, b) = (sql[open..in_start].trim(), sql[in_end..close].trim());
                        if a.is_empty() || b.is_empty() {
                            return None;
                        }
                        return Some(format!(
                            "{}pg_catalog.position({b}, {a}){}",
                            &sql[..start],
                            &sql[end..]
                        ));
                    }
                }
                t if depth == 1 && is_word(t, "in") && in_at.is_none() => in_at = Some(j),
                _ => {}
            }
        }
        return None;
    }
    None
}

/// Byte offset of a tokenizer location (1-based line and column, counted in chars as
/// the tokenizer counts them: a newline starts the next line).
fn offsets(sql: &str) -> impl Fn(u64, u64) -> Option<usize> + '_ {
    let mut starts = vec![0usize];
    for (i, c) in sql.char_indices() {
        if c == '\n' {
            starts.push(i + 1);
        }
    }
    move |line, column| {
        let base = *starts.get(usize::try_from(line).ok()?.checked_sub(1)?)?;
        let col = usize::try_from(column).ok()?.checked_sub(1)?;
        let rest = &sql[base..];
        match rest.char_indices().nth(col) {
            Some((i, _)) => Some(base + i),
            None if rest.chars().count() == col => Some(sql.len()),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite;

    #[test]
    fn rewrites_like_the_postgres_grammar() {
        assert_eq!(
            rewrite("SELECT * FROM t, position('om' in 'Thomas') WHERE a = 1").as_deref(),
            Some("SELECT * FROM t, pg_catalog.position('Thomas', 'om') WHERE a = 1")
        );
        assert_eq!(
            rewrite("select POSITION(lower(x) IN f(y, 'a in b'))\nfrom t").as_deref(),
            Some("select pg_catalog.position(f(y, 'a in b'), lower(x))\nfrom t")
        );
        assert_eq!(
            rewrite("SELECT 'é', position('a' in position('b' in 'c')::text)").as_deref(),
            Some("SELECT 'é', pg_catalog.position(pg_catalog.position('c', 'b')::text, 'a')")
        );
        assert_eq!(rewrite("SELECT \"position\"(1, 2)"), None);
        assert_eq!(rewrite("SELECT pg_catalog.position('a', 'b')"), None);
        assert_eq!(rewrite("SELECT position FROM t"), None);
    }
}
