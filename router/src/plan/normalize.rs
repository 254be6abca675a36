//! Statement normalisation for the plan cache: one pass of a small SQL lexer that
//! turns the literals of a statement into parameters (`$k`, numbered after the
//! client's own `$n`; identical literal tokens share one number), drops comments and
//! collapses whitespace. Two statements that differ only in literal values get the
//! same normalised text, so they share one plan; the literals are kept (raw tokens)
//! and written back into the shard SQL when the plan is bound.
//!
//! Only literals whose place allows a parameter are taken: a string after a type name
//! (`DATE '2024-01-01'`, `interval '1 day'`) stays, as do dollar-quoted strings and
//! bit/hex/Unicode strings. The lexer also tells the statement's kind (read or write)
//! and whether the text holds more than one statement.

/// A normalised statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The text with literals replaced by `$k`.
    pub text: String,
    /// The raw literal tokens, `$first+1` first.
    pub literals: Vec<String>,
    /// The client's own parameters: the highest `$n` of the original text.
    pub client_params: u32,
    /// More than one statement (a `;` followed by more SQL).
    pub multi: bool,
    /// Reads only (SELECT / VALUES / TABLE / WITH without INSERT, UPDATE, DELETE,
    /// MERGE or a locking clause).
    pub read_only: bool,
}

/// One token of SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tok {
    Space,
    /// A word: keyword or unquoted identifier.
    Word,
    /// A quoted identifier.
    Quoted,
    /// A `'...'` or `E'...'` string (normalisable).
    Str,
    /// Any other string form (`$tag$...$tag$`, `B'..'`, `X'..'`, `U&'..'`).
    OtherStr,
    Number,
    /// `$n`.
    Param,
    /// `{tN}` (plan templates).
    Placeholder,
    /// `;`
    Semi,
    /// Operators and punctuation.
    Punct,
}

/// The statements of a string of several, each from its first token (comments are
/// spaces to the lexer) to its `;` (excluded) or the end of the text; empty ones
/// (`;;`) are skipped.
pub(crate) fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut first = None;
    for (kind, s, _) in tokens(sql) {
        match kind {
            Tok::Semi => {
                if let Some(f) = first.take() {
                    out.push(&sql[f..s]);
                }
            }
            Tok::Space => {}
            _ if first.is_none() => first = Some(s),
            _ => {}
        }
    }
    if let Some(f) = first {
        out.push(&sql[f..]);
    }
    out
}

/// Splits SQL text into tokens: (kind, start, end). Never fails: unterminated strings
/// or comments run to the end of the text.
pub(crate) fn tokens(sql: &str) -> Vec<(Tok, usize, usize)> {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 || c == b'$';
    let mut out = Vec::with_capacity(b.len() / 3);
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let c = b[i];
        let kind = match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                while i < b.len() && b[i].is_ascii_whitespace() {
                    i += 1;
                }
                Tok::Space
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                // To the end of the line: \n or \r, as Postgres's scanner.
                while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                    i += 1;
                }
                Tok::Space
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                Tok::Space
            }
            b'\'' => {
                i = skip_string(b, i + 1, false);
                Tok::Str
            }
            b'e' | b'E' if b.get(i + 1) == Some(&b'\'') => {
                i = skip_string(b, i + 2, true);
                Tok::Str
            }
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if b.get(i + 1) == Some(&b'\'') => {
                i = skip_string(b, i + 2, false);
                Tok::OtherStr
            }
            b'u' | b'U' if b.get(i + 1) == Some(&b'&') && b.get(i + 2) == Some(&b'\'') => {
                i = skip_string(b, i + 3, false);
                Tok::OtherStr
            }
            b'"' => {
                i += 1;
                while i < b.len() {
                    if b[i] == b'"' {
                        if b.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i = (i + 1).min(b.len());
                Tok::Quoted
            }
            b'$' => {
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits > 0 {
                    i += 1 + digits;
                    Tok::Param
                } else {
                    let tag_len = b[i + 1..]
                        .iter()
                        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c >= 0x80)
                        .count();
                    if b.get(i + 1 + tag_len) == Some(&b'$') {
                        let tag = &sql[i..i + 2 + tag_len];
                        match sql[i + tag.len()..].find(tag) {
                            Some(end) => i += tag.len() + end + tag.len(),
                            None => i = b.len(),
                        }
                        Tok::OtherStr
                    } else {
                        i += 1;
                        Tok::Punct
                    }
                }
            }
            b'0'..=b'9' => {
                i = skip_number(b, i);
                Tok::Number
            }
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i = skip_number(b, i);
                Tok::Number
            }
            b'{' if b.get(i + 1) == Some(&b't') => {
                let digits = b[i + 2..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits > 0 && b.get(i + 2 + digits) == Some(&b'}') {
                    i += 3 + digits;
                    Tok::Placeholder
                } else {
                    i += 1;
                    Tok::Punct
                }
            }
            b';' => {
                i += 1;
                Tok::Semi
            }
            c if ident(c) => {
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                Tok::Word
            }
            _ => {
                // One character (UTF-8 continuation bytes stay with their lead byte).
                i += 1;
                while i < b.len() && (b[i] & 0xC0) == 0x80 {
                    i += 1;
                }
                Tok::Punct
            }
        };
        out.push((kind, start, i.min(b.len())));
    }
    out
}

/// Past the closing quote of a string whose body starts at `i`.
fn skip_string(b: &[u8], mut i: usize, escapes: bool) -> usize {
    while i < b.len() {
        if escapes && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == b'\'' {
            if b.get(i + 1) == Some(&b'\'') {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

fn skip_number(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b'_') {
        i += 1;
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        let mut j = i + 1;
        if j < b.len() && matches!(b[j], b'+' | b'-') {
            j += 1;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            i = j;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    i
}

/// Words after which a string literal is a value (not a typed literal such as
/// `DATE '...'`).
const VALUE_WORDS: &[&str] = &[
    "and",
    "or",
    "not",
    "in",
    "is",
    "like",
    "ilike",
    "similar",
    "between",
    "then",
    "else",
    "when",
    "select",
    "where",
    "returning",
    "values",
    "having",
    "on",
    "set",
    "distinct",
    "all",
    "any",
    "some",
    "limit",
    "offset",
    "escape",
    "case",
    "by",
    "return",
];

/// Normalises `sql` (see the module doc).
pub fn normalize(sql: &str) -> Normalized {
    let toks = tokens(sql);
    let client_params = toks
        .iter()
        .filter(|t| t.0 == Tok::Param)
        .filter_map(|t| sql[t.1 + 1..t.2].parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    let mut text = String::with_capacity(sql.len());
    let mut literals: Vec<String> = Vec::new();
    let mut multi = false;
    let mut ended = false;
    let mut first_word: Option<&str> = None;
    let mut writes = false;
    let mut prev: Option<(Tok, &str)> = None;
    let mut pending_space = false;
    for &(kind, s, e) in &toks {
        let tok = &sql[s..e];
        if kind == Tok::Space {
            pending_space = !text.is_empty();
            continue;
        }
        if ended {
            if kind != Tok::Semi {
                multi = true;
            }
        } else if kind == Tok::Semi {
            ended = true;
            continue;
        }
        if kind == Tok::Word {
            if first_word.is_none() {
                first_word = Some(tok);
            }
            if ["insert", "update", "delete", "merge", "share", "copy"]
                .iter()
                .any(|w| tok.eq_ignore_ascii_case(w))
            {
                writes = true;
            }
        }
        let literal = match kind {
            Tok::Number => true,
            Tok::Str => match prev {
                None => false,
                Some((Tok::Word, w)) => VALUE_WORDS.iter().any(|v| w.eq_ignore_ascii_case(v)),
                Some((Tok::Punct | Tok::Semi, _)) => true,
                Some(_) => false,
            },
            _ => false,
        };
        if pending_space {
            text.push(' ');
            pending_space = false;
        }
        if literal && !ended {
            let at = match literals.iter().position(|l| l == tok) {
                Some(at) => at,
                None => {
                    literals.push(tok.to_owned());
                    literals.len() - 1
                }
            };
            text.push('$');
            text.push_str(&(client_params as usize + at + 1).to_string());
        } else {
            text.push_str(tok);
        }
        prev = Some((kind, tok));
    }
    let read_only = !writes
        && first_word.is_some_and(|w| {
            ["select", "values", "table", "with"]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k))
        });
    Normalized {
        text,
        literals,
        client_params,
        multi,
        read_only,
    }
}

/// A literal token (as kept by [`normalize`]) -> its text value: a string unquoted
/// and unescaped, a number as written.
pub fn literal_text(token: &str) -> String {
    let b = token.as_bytes();
    let (body, escapes) = match b.first() {
        Some(b'\'') => (&token[1..token.len().saturating_sub(1).max(1)], false),
        Some(b'e' | b'E') if b.get(1) == Some(&b'\'') => {
            (&token[2..token.len().saturating_sub(1).max(2)], true)
        }
        _ => return token.replace('_', ""),
    };
    if !escapes {
        return body.replace("''", "'");
    }
    // Escapes make bytes (`\303\251` is one UTF-8 character) or code points
    // (`\u65e5`, `\U0001F600`, a `\uD83D\uDE00` surrogate pair), as Postgres reads
    // them.
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    let push_char = |out: &mut Vec<u8>, c: char| {
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    };
    let mut chars = body.chars().peekable();
    let hex = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>, n: usize| -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            v = v * 16 + chars.next()?.to_digit(16)?;
        }
        Some(v)
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' if chars.peek() == Some(&'\'') => {
                chars.next();
                out.push(b'\'');
            }
            '\\' => match chars.next() {
                Some('n') => out.push(b'\n'),
                Some('t') => out.push(b'\t'),
                Some('r') => out.push(b'\r'),
                Some('b') => out.push(8),
                Some('f') => out.push(12),
                Some(d @ '0'..='7') => {
                    let mut v = d.to_digit(8).unwrap_or(0);
                    for _ in 0..2 {
                        match chars.peek().and_then(|c| c.to_digit(8)) {
                            Some(x) => {
                                v = v * 8 + x;
                                chars.next();
                            }
                            None => break,
                        }
                    }
                    out.push(v as u8);
                }
                Some('x') => {
                    let mut v = 0;
                    for _ in 0..2 {
                        match chars.peek().and_then(|c| c.to_digit(16)) {
                            Some(x) => {
                                v = v * 16 + x;
                                chars.next();
                            }
                            None => break,
                        }
                    }
                    out.push(v as u8);
                }
                Some(u @ ('u' | 'U')) => {
                    let n = if u == 'u' { 4 } else { 8 };
                    let mut v = hex(&mut chars, n);
                    // A high surrogate takes the low one that follows.
                    if let Some(hi @ 0xD800..=0xDBFF) = v {
                        let mut rest = chars.clone();
                        v = match (rest.next(), rest.next()) {
                            (Some('\\'), Some('u')) => match hex(&mut rest, 4) {
                                Some(lo @ 0xDC00..=0xDFFF) => {
                                    chars = rest;
                                    Some(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                                }
                                _ => None,
                            },
                            _ => None,
                        };
                    }
                    // Invalid: Postgres refuses the string; the node says so.
                    push_char(&mut out, v.and_then(char::from_u32).unwrap_or('\u{fffd}'));
                }
                Some(other) => push_char(&mut out, other),
                None => {}
            },
            c => push_char(&mut out, c),
        }
    }
    // Invalid UTF-8 (`\377`): Postgres refuses the string, and the node does when it
    // runs the statement, whichever shard it is.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_string_literals_mean_what_postgres_reads() {
        assert_eq!(literal_text(r"E'\u65e5\u672c'"), "日本");
        assert_eq!(literal_text(r"E'\U000065e5\u672c'"), "日本");
        assert_eq!(literal_text(r"e'\303\251t\xc3\xa9'"), "été");
        assert_eq!(literal_text(r"E'\uD83D\uDE00!'"), "😀!");
        assert_eq!(literal_text(r"E'a\'b\\c\n'"), "a'b\\c\n");
        assert_eq!(literal_text(r"E'\x61\141'"), "aa");
        assert_eq!(literal_text("'日本'"), "日本");
    }

    #[test]
    fn literals_become_parameters_after_the_clients_own() {
        let n = normalize("SELECT * FROM t WHERE id = 42 AND name = 'a''b' AND x = $1");
        assert_eq!(
            n.text,
            "SELECT * FROM t WHERE id = $2 AND name = $3 AND x = $1"
        );
        assert_eq!(n.literals, ["42", "'a''b'"]);
        assert_eq!(n.client_params, 1);
        assert!(n.read_only && !n.multi);
        assert_eq!(literal_text(&n.literals[1]), "a'b");
    }

    #[test]
    fn same_shape_same_text() {
        let a = normalize("select v from t  where id=1 -- c\n");
        let b = normalize("select v from t where id=2;");
        assert_eq!(a.text, b.text);
        assert_ne!(a.literals, b.literals);
    }

    #[test]
    fn identical_literals_share_a_number() {
        let n = normalize("SELECT * FROM a JOIN b ON a.k = b.k WHERE a.k = 7 AND b.k = 7");
        assert_eq!(n.text.matches("$1").count(), 2);
        assert_eq!(n.literals, ["7"]);
    }

    #[test]
    fn typed_and_other_strings_stay() {
        let n = normalize(
            "SELECT DATE '2024-01-01', interval '1 day', $$x$$, B'101', E'a\\'b', 'v'::text",
        );
        assert_eq!(
            n.text,
            "SELECT DATE '2024-01-01', interval '1 day', $$x$$, B'101', $1, $2::text"
        );
        assert_eq!(literal_text(&n.literals[0]), "a'b");
    }

    #[test]
    fn kinds_and_multi() {
        assert!(!normalize("UPDATE t SET a = 1 WHERE id = 2").read_only);
        assert!(!normalize("SELECT * FROM t WHERE id = 1 FOR UPDATE").read_only);
        assert!(!normalize("WITH x AS (DELETE FROM t RETURNING *) SELECT 1").read_only);
        assert!(normalize("SELECT 1; ").read_only);
        assert!(normalize("SELECT 1; SELECT 2").multi);
        assert!(!normalize("SELECT ';'").multi);
        assert!(normalize("SELECT 'update'").read_only);
    }

    #[test]
    fn placeholders_are_tokens() {
        let t = tokens("SELECT * FROM {t0} AS x, '{t1}'");
        assert_eq!(
            t.iter().filter(|t| t.0 == Tok::Placeholder).count(),
            1,
            "{t:?}"
        );
    }
}
