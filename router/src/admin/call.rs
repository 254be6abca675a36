//! Recognising an admin function call (`SELECT create_distributed_table('t', 'id')`)
//! and binding its arguments, positional or named (`shard_count => 8`), to the
//! function's parameters, with Citus's names and defaults.

use super::AdminError;
use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, SelectItem, SetExpr, Statement,
    UnaryOperator, Value,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    AddNode,
    RemoveNode,
    SetCoordinatorHost,
    CreateDistributedTable,
    CreateReferenceTable,
    UndistributeTable,
    GetShardId,
    ReloadPlugins,
    RecoverPrepared,
}

/// (function, SQL name, parameter names in order, how many are required).
const FUNCS: &[(Func, &str, &[&str], usize)] = &[
    (
        Func::AddNode,
        "citus_add_node",
        &["nodename", "nodeport", "groupid", "noderole", "nodecluster"],
        1,
    ),
    (
        Func::RemoveNode,
        "citus_remove_node",
        &["nodename", "nodeport"],
        2,
    ),
    (
        Func::SetCoordinatorHost,
        "citus_set_coordinator_host",
        &["host", "port", "node_role", "node_cluster"],
        1,
    ),
    (
        Func::CreateDistributedTable,
        "create_distributed_table",
        &[
            "table_name",
            "distribution_column",
            "distribution_type",
            "colocate_with",
            "shard_count",
            "distribution_plugin",
        ],
        2,
    ),
    (
        Func::CreateReferenceTable,
        "create_reference_table",
        &["table_name"],
        1,
    ),
    (
        Func::UndistributeTable,
        "undistribute_table",
        &["table_name", "cascade_via_foreign_keys"],
        1,
    ),
    (
        Func::GetShardId,
        "get_shard_id_for_distribution_column",
        &["table_name", "distribution_value"],
        1,
    ),
    (Func::ReloadPlugins, "shardgate_reload_plugins", &[], 0),
    (
        Func::RecoverPrepared,
        "recover_prepared_transactions",
        &[],
        0,
    ),
];

/// Cheap test on every simple query: could this text call an admin function? Every
/// admin function's name has a `_` right after one of these words.
pub fn may_be_call(sql: &str) -> bool {
    const WORDS: &[&[u8]] = &[
        b"citus",
        b"create",
        b"undistribute",
        b"get",
        b"shardgate",
        b"recover",
    ];
    let b = sql.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c == b'_'
            && WORDS
                .iter()
                .any(|w| i >= w.len() && b[i - w.len()..i].eq_ignore_ascii_case(w))
    })
}

#[derive(Debug)]
pub struct Call {
    pub func: Func,
    pub name: &'static str,
    /// The result column's name (the function's, or the alias).
    pub column: String,
    /// One entry per parameter; `None`: not given or NULL.
    args: Vec<Option<String>>,
    params: &'static [&'static str],
}

impl Call {
    pub fn arg(&self, name: &str) -> Option<&str> {
        let i = self.params.iter().position(|p| *p == name)?;
        self.args[i].as_deref()
    }

    pub fn required(&self, name: &str) -> Result<&str, AdminError> {
        self.arg(name).ok_or_else(|| {
            AdminError::InvalidParameter(format!("{}: {name} must not be NULL", self.name))
        })
    }
}

/// Parses `SELECT f(args) [AS alias]` when `f` is an admin function. `Ok(None)`: not
/// an admin call (the statement goes to the coordinator as it is).
pub fn parse(
    statements: &[Statement],
    values: &[Option<String>],
) -> Result<Option<Call>, AdminError> {
    let [Statement::Query(q)] = statements else {
        if statements.iter().any(|s| find_call(s).is_some()) {
            return Err(AdminError::NotSupported(
                "an admin function must be called in a statement of its own".into(),
            ));
        }
        return Ok(None);
    };
    let Some((f, column)) = find_call(&Statement::Query(q.clone())) else {
        return Ok(None);
    };
    let SetExpr::Select(sel) = q.body.as_ref() else {
        return Ok(None);
    };
    let from_ok = sel.from.is_empty() || table_call(sel).is_some();
    if sel.projection.len() != 1 || !from_ok || sel.selection.is_some() {
        return Err(AdminError::NotSupported(
            "an admin function must be called as SELECT f(...) on its own".into(),
        ));
    }
    let (func, name, params, required) = FUNCS
        .iter()
        .find(|(_, n, _, _)| *n == f.0)
        .copied()
        .expect("find_call only returns known functions");
    let mut args: Vec<Option<String>> = vec![None; params.len()];
    let mut given = vec![false; params.len()];
    let mut positional = 0;
    let mut named_seen = false;
    for a in f.1 {
        let (slot, expr) = match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => {
                if named_seen {
                    return Err(AdminError::Syntax(
                        "positional argument cannot follow named argument".into(),
                    ));
                }
                positional += 1;
                if positional > params.len() {
                    return Err(no_such_function(name));
                }
                (positional - 1, e)
            }
            FunctionArg::Named {
                name: sqlparser::ast::Ident { value: n, .. },
                arg: FunctionArgExpr::Expr(e),
                ..
            }
            | FunctionArg::ExprNamed {
                name: Expr::Identifier(sqlparser::ast::Ident { value: n, .. }),
                arg: FunctionArgExpr::Expr(e),
                ..
            } => {
                named_seen = true;
                let key = n.to_lowercase();
                let Some(i) = params.iter().position(|p| *p == key) else {
                    return Err(no_such_function(name));
                };
                (i, e)
            }
            _ => return Err(no_such_function(name)),
        };
        if given[slot] {
            return Err(AdminError::Syntax(format!(
                "argument \"{}\" of {name} is given twice",
                params[slot]
            )));
        }
        given[slot] = true;
        args[slot] = constant(&expr, name, values)?;
    }
    if given.iter().take(required).any(|g| !g) {
        return Err(no_such_function(name));
    }
    Ok(Some(Call {
        func,
        name,
        column,
        args,
        params,
    }))
}

/// The types of the `$n` parameters of an admin call (extended protocol Describe):
/// integers for ports, counts and groups, boolean for flags, text otherwise.
pub fn placeholder_types(statements: &[Statement]) -> Vec<u32> {
    let mut types: Vec<u32> = Vec::new();
    let Some(((name, args), _)) = statements.first().and_then(find_call) else {
        return types;
    };
    let params = FUNCS
        .iter()
        .find(|(_, n, _, _)| *n == name)
        .map(|f| f.2)
        .unwrap_or(&[]);
    for (i, a) in args.iter().enumerate() {
        let (pname, e) = match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => (params.get(i).copied(), e),
            FunctionArg::Named {
                name,
                arg: FunctionArgExpr::Expr(e),
                ..
            } => (
                params
                    .iter()
                    .copied()
                    .find(|p| *p == name.value.to_lowercase()),
                e,
            ),
            FunctionArg::ExprNamed {
                name: Expr::Identifier(name),
                arg: FunctionArgExpr::Expr(e),
                ..
            } => (
                params
                    .iter()
                    .copied()
                    .find(|p| *p == name.value.to_lowercase()),
                e,
            ),
            _ => continue,
        };
        let mut e = e;
        while let Expr::Cast { expr, .. } | Expr::Nested(expr) = e {
            e = expr;
        }
        let Expr::Value(v) = e else { continue };
        let Value::Placeholder(p) = &v.value else {
            continue;
        };
        let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        if n == 0 || n > 1000 {
            continue;
        }
        if types.len() < n {
            types.resize(n, 25);
        }
        types[n - 1] = match pname {
            Some("nodeport" | "port" | "groupid" | "shard_count") => 23,
            Some("cascade_via_foreign_keys") => 16,
            _ => 25,
        };
    }
    types
}

fn no_such_function(name: &str) -> AdminError {
    AdminError::UndefinedFunction(format!(
        "function {name} with these arguments does not exist"
    ))
}

/// The admin function a statement calls at its top level: (name, arguments), and the
/// output column name.
fn find_call(s: &Statement) -> Option<((&'static str, Vec<FunctionArg>), String)> {
    let Statement::Query(q) = s else { return None };
    let SetExpr::Select(sel) = q.body.as_ref() else {
        return None;
    };
    // SELECT * FROM f(...)
    if let Some(f) = table_call(sel) {
        return Some(f);
    }
    for item in &sel.projection {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.value.clone())),
            _ => continue,
        };
        let Expr::Function(f) = expr else { continue };
        let parts = &f.name.0;
        let fname = parts.last()?.as_ident()?.value.to_lowercase();
        if parts.len() > 1 {
            let schema = parts[0].as_ident()?.value.to_lowercase();
            if !matches!(schema.as_str(), "pg_catalog" | "shardgate" | "citus") {
                continue;
            }
        }
        let Some((_, name, _, _)) = FUNCS.iter().find(|(_, n, _, _)| *n == fname) else {
            continue;
        };
        let args = match &f.args {
            FunctionArguments::None => Vec::new(),
            FunctionArguments::List(l) => l.args.clone(),
            FunctionArguments::Subquery(_) => continue,
        };
        return Some(((name, args), alias.unwrap_or_else(|| name.to_string())));
    }
    None
}

/// `SELECT * FROM f(args)` of an admin function: (name, args), column name.
fn table_call(sel: &sqlparser::ast::Select) -> Option<((&'static str, Vec<FunctionArg>), String)> {
    use sqlparser::ast::TableFactor;
    if sel.projection.len() != 1
        || !matches!(sel.projection[0], SelectItem::Wildcard(_))
        || sel.from.len() != 1
        || !sel.from[0].joins.is_empty()
    {
        return None;
    }
    let TableFactor::Table {
        name,
        args: Some(args),
        ..
    } = &sel.from[0].relation
    else {
        return None;
    };
    let fname = name.0.last()?.as_ident()?.value.to_lowercase();
    let (_, n, _, _) = FUNCS.iter().find(|(_, n, _, _)| *n == fname)?;
    Some(((n, args.args.clone()), n.to_string()))
}

/// A constant argument: a literal, possibly cast or negated. NULL is `None`.
fn constant(e: &Expr, func: &str, params: &[Option<String>]) -> Result<Option<String>, AdminError> {
    match e {
        Expr::Value(v) => Ok(match &v.value {
            Value::Null => None,
            // Not bound yet (a Parse being looked at): unknown.
            Value::Placeholder(_) if params.is_empty() => None,
            Value::Placeholder(p) => {
                let n: usize = p
                    .strip_prefix('$')
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n >= 1 && *n <= params.len())
                    .ok_or_else(|| {
                        AdminError::InvalidParameter(format!(
                            "there is no parameter {p} ({} given)",
                            params.len()
                        ))
                    })?;
                params[n - 1].clone()
            }
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::DollarQuotedString(sqlparser::ast::DollarQuotedString { value: s, .. }) => {
                Some(s.clone())
            }
            Value::Number(n, _) => Some(n.to_string()),
            Value::Boolean(b) => Some(b.to_string()),
            other => Some(other.to_string()),
        }),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => constant(expr, func, params),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => Ok(constant(expr, func, params)?.map(|v| format!("-{v}"))),
        Expr::TypedString(ts) => Ok(Some(match &ts.value.value {
            Value::SingleQuotedString(s) => s.clone(),
            other => other.to_string(),
        })),
        _ => Err(AdminError::NotSupported(format!(
            "the arguments of {func} must be constants (got {e})"
        ))),
    }
}

/// Parses SQL text with Postgres's dialect.
pub fn parse_sql(sql: &str) -> Result<Vec<Statement>, sqlparser::parser::ParserError> {
    sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(sql: &str) -> Result<Option<Call>, AdminError> {
        parse(&parse_sql(sql).unwrap(), &[])
    }

    #[test]
    fn recognises_calls() {
        assert!(may_be_call("SELECT create_distributed_table('t', 'id')"));
        assert!(may_be_call("select CITUS_add_node('h', 1)"));
        assert!(!may_be_call(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1"
        ));
        let c = call(
            "SELECT create_distributed_table('t', 'id', shard_count => 8, colocate_with => 'none')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.func, Func::CreateDistributedTable);
        assert_eq!(c.arg("table_name"), Some("t"));
        assert_eq!(c.arg("shard_count"), Some("8"));
        assert_eq!(c.arg("colocate_with"), Some("none"));
        assert_eq!(c.arg("distribution_plugin"), None);
        let c = call("SELECT * FROM shardgate_reload_plugins()")
            .unwrap()
            .unwrap();
        assert_eq!(c.func, Func::ReloadPlugins);
        let c = call("SELECT pg_catalog.citus_add_node('h', 5433) AS id")
            .unwrap()
            .unwrap();
        assert_eq!((c.column.as_str(), c.arg("nodeport")), ("id", Some("5433")));
        assert!(call("SELECT create_table_x(1)").unwrap().is_none());
        assert!(call("SELECT 1").unwrap().is_none());
        assert!(matches!(
            call("SELECT create_distributed_table('t')"),
            Err(AdminError::UndefinedFunction(_))
        ));
        assert!(matches!(
            call("SELECT create_distributed_table('t', 'id', shard_count => 1, shard_count => 2)"),
            Err(AdminError::Syntax(_))
        ));
        assert!(matches!(
            call("SELECT create_reference_table(t.x) FROM t"),
            Err(AdminError::NotSupported(_))
        ));
    }
}
