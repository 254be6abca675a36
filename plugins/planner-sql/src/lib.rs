//! What the planner tiers share: how they read names as Postgres does (`names`), and
//! what they do to a parsed statement before printing it as a plan template, where
//! sqlparser's printing would change what the statement means.

use sqlparser::ast::{self, Expr, Value};
use std::ops::ControlFlow;

mod names;
pub use names::{fold, matching_tables};

/// sqlparser prints a prefix operator right against its operand: `- -1` comes out as
/// `--1` (a comment to Postgres: the rest of the line is lost), `@ -x` as `@-x` (another
/// operator). An operand that starts with an operator character is put in parentheses
/// (`-(-1)`, `@(-x)`), which means the same.
pub fn parenthesize_prefix_operands(stmt: &mut ast::Statement) {
    let _ = ast::visit_expressions_mut(stmt, |e| {
        if let Expr::UnaryOp { expr, .. } = e
            && expr
                .to_string()
                .starts_with(|c: char| "+-*/<>=~!@#%^&|`?".contains(c))
        {
            let inner = std::mem::replace(&mut **expr, Expr::Value(Value::Null.into()));
            **expr = Expr::Nested(Box::new(inner));
        }
        ControlFlow::<()>::Continue(())
    });
}

/// Casts a key may carry and still be the value it is written as: integer types, text
/// and varchar without a length, uuid, boolean. Others (`varchar(2)`, `char(n)`,
/// `numeric`...) may change the value, so such a key does not pin a shard. (A string
/// cast to an integer type is read as the integer: [`integer_text`].)
pub fn value_preserving_cast(t: &ast::DataType) -> bool {
    use ast::DataType as D;
    integer_type(t)
        || matches!(
            t,
            D::Text | D::Varchar(None) | D::CharacterVarying(None) | D::Uuid | D::Bool | D::Boolean
        )
}

/// Integer types: a cast to one reads a string as a number.
pub fn integer_type(t: &ast::DataType) -> bool {
    use ast::DataType as D;
    matches!(
        t,
        D::SmallInt(_)
            | D::Int(_)
            | D::Integer(_)
            | D::BigInt(_)
            | D::Int2(_)
            | D::Int4(_)
            | D::Int8(_)
    )
}

/// A string as Postgres's integer input reads it (spaces around it, a sign, decimal
/// digits), or `None`: then the cast is left to Postgres, and the value pins nothing.
pub fn integer_text(s: &str) -> Option<i64> {
    s.trim_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c'])
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn printed(sql: &str) -> String {
        let mut s = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        super::parenthesize_prefix_operands(&mut s);
        s.to_string()
    }

    #[test]
    fn prefix_operands_keep_their_meaning() {
        assert_eq!(printed("SELECT - -1"), "SELECT -(-1)");
        assert_eq!(printed("SELECT - - -x"), "SELECT -(-(-x))");
        assert_eq!(printed("SELECT -x, 1 - -2"), "SELECT -x, 1 - -2");
    }

    #[test]
    fn strings_read_as_integers() {
        assert_eq!(super::integer_text(" 007\n"), Some(7));
        assert_eq!(super::integer_text("-12"), Some(-12));
        assert_eq!(super::integer_text("1.5"), None);
        assert_eq!(super::integer_text("99999999999999999999"), None);
    }
}
