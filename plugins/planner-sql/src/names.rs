//! How the planner tiers read names the way Postgres does.

use sqlparser::ast::{Ident, ObjectName, ObjectNamePart};

/// An identifier as Postgres compares it: unquoted ones fold to lower case.
pub fn fold(id: &Ident) -> String {
    match id.quote_style {
        None => id.value.to_lowercase(),
        Some(_) => id.value.clone(),
    }
}

/// The catalog tables (indexes of `tables`, each `(schema, name)` as stored) that a
/// table name written in SQL may mean: `t` matches every table called `t` (the catalog
/// view carries no search_path; the caller decides what several matches mean), and
/// `schema.t` the one of that schema. `Err`: a name no table can have here (a database
/// part, a non-identifier part).
pub fn matching_tables<'t>(
    name: &ObjectName,
    tables: impl Iterator<Item = (&'t str, &'t str)>,
) -> Result<Vec<usize>, String> {
    let parts: Vec<&Ident> = name.0.iter().filter_map(ObjectNamePart::as_ident).collect();
    if parts.len() != name.0.len() {
        return Err(format!("unusual table name {name}"));
    }
    let (schema, table) = match parts.as_slice() {
        [t] => (None, fold(t)),
        [s, t] => (Some(fold(s)), fold(t)),
        _ => return Err(format!("table name {name} has a database part")),
    };
    Ok(tables
        .enumerate()
        .filter(|(_, (s, t))| *t == table && schema.as_deref().is_none_or(|x| x == *s))
        .map(|(i, _)| i)
        .collect())
}
