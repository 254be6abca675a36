//! Who may do what on a distributed or reference table's shards: the table's owner, its
//! table and column privileges, its row-level security switches and policies, as the
//! coordinator has them. Shards get them when they are created and again after every
//! GRANT, REVOKE or POLICY statement on the table (`ddl.rs`), so that a role a client
//! takes (`SET ROLE`, `SET LOCAL ROLE`, `set_config('role', ...)`) is checked on the
//! workers as it would be on one Postgres.
//!
//! Roles themselves are not propagated: a role missing on a node is skipped there
//! (a WARNING in that node's log), which leaves the shard with fewer rights, never more.
//! A policy whose expression names something the node lacks (another table, a function)
//! is skipped the same way: with row-level security on and no policy, the shard shows
//! nothing to the roles it applies to.

use super::shape::quote_ident;
use tokio_postgres::Client;

/// One privilege of one grantee: `privilege [(column)] TO grantee [WITH GRANT OPTION]`.
#[derive(Debug, Clone, PartialEq)]
struct Grant {
    privilege: String,
    column: Option<String>,
    /// `PUBLIC` or a quoted role name.
    grantee: String,
    grantable: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Policy {
    name: String,
    permissive: bool,
    /// `ALL`, `SELECT`, `INSERT`, `UPDATE` or `DELETE`.
    command: &'static str,
    /// `PUBLIC` or quoted role names.
    roles: Vec<String>,
    using: Option<String>,
    check: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Privileges {
    /// The owner's role name, quoted.
    owner: String,
    grants: Vec<Grant>,
    row_security: bool,
    force_row_security: bool,
    policies: Vec<Policy>,
}

impl Privileges {
    /// Reads them from the coordinator, policy expressions with every name qualified
    /// (inside a transaction: `shape::catalog_path`).
    pub async fn read_qualified(c: &Client, oid: u32) -> Result<Privileges, tokio_postgres::Error> {
        let saved = super::shape::catalog_path(c).await?;
        let p = Self::read(c, oid).await;
        super::shape::restore_path(c, &saved).await?;
        p
    }

    /// Reads them from the coordinator. Policy expressions are printed with the
    /// session's search_path: `TableShape::read` calls this with only pg_catalog on it,
    /// so that every name comes out qualified.
    pub async fn read(c: &Client, oid: u32) -> Result<Privileges, tokio_postgres::Error> {
        let role =
            |col: &str| format!("CASE WHEN {col} = 0 THEN 'PUBLIC' ELSE {col}::regrole::text END");
        let head = c
            .query_one(
                "SELECT relowner::regrole::text, relrowsecurity, relforcerowsecurity
                 FROM pg_class WHERE oid = $1",
                &[&oid],
            )
            .await?;
        // An ACL that was never set is the owner's default one: spelled out, so that
        // the shard (owned by whoever created it) ends up with exactly the same.
        let mut grants: Vec<Grant> = c
            .query(
                &format!(
                    "SELECT a.privilege_type, {}, a.is_grantable
                     FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                     WHERE c.oid = $1 ORDER BY 2, 1",
                    role("a.grantee")
                ),
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| Grant {
                privilege: r.get(0),
                column: None,
                grantee: r.get(1),
                grantable: r.get(2),
            })
            .collect();
        grants.extend(
            c.query(
                &format!(
                    "SELECT a.privilege_type, att.attname::text, {}, a.is_grantable
                     FROM pg_attribute att, aclexplode(att.attacl) a
                     WHERE att.attrelid = $1 AND att.attnum > 0 AND NOT att.attisdropped
                       AND att.attacl IS NOT NULL
                     ORDER BY att.attnum, 3, 1",
                    role("a.grantee")
                ),
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| Grant {
                privilege: r.get(0),
                column: Some(r.get(1)),
                grantee: r.get(2),
                grantable: r.get(3),
            }),
        );
        let policies = c
            .query(
                &format!(
                    "SELECT p.polname::text, p.polpermissive, p.polcmd::text,
                            ARRAY(SELECT {} FROM unnest(p.polroles) r ORDER BY 1),
                            pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
                     FROM pg_policy p WHERE p.polrelid = $1 ORDER BY 1",
                    role("r")
                ),
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| Policy {
                name: r.get(0),
                permissive: r.get(1),
                command: match r.get::<_, String>(2).as_str() {
                    "r" => "SELECT",
                    "a" => "INSERT",
                    "w" => "UPDATE",
                    "d" => "DELETE",
                    _ => "ALL",
                },
                roles: r.get(3),
                using: r.get(4),
                check: r.get(5),
            })
            .collect();
        Ok(Privileges {
            owner: head.get(0),
            grants,
            row_security: head.get(1),
            force_row_security: head.get(2),
            policies,
        })
    }

    /// The statements that give `shard` (qualified and quoted) these privileges,
    /// whatever it had: every grant and policy it has is dropped first.
    pub fn shard_sql(&self, shard: &str) -> Vec<String> {
        let rel = literal(shard);
        let mut out = vec![format!(
            "DO $sg$ DECLARE r record; BEGIN
             FOR r IN SELECT DISTINCT a.grantee FROM pg_class c,
                     aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                     WHERE c.oid = {rel}::regclass LOOP
                 EXECUTE format('REVOKE ALL ON TABLE %s FROM %s', {rel}::regclass,
                     CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE r.grantee::regrole::text END);
             END LOOP;
             FOR r IN SELECT polname FROM pg_policy WHERE polrelid = {rel}::regclass LOOP
                 EXECUTE format('DROP POLICY %I ON %s', r.polname, {rel}::regclass);
             END LOOP;
             END $sg$"
        )];
        out.push(unless_missing(&format!(
            "ALTER TABLE {shard} OWNER TO {}",
            self.owner
        )));
        for g in &self.grants {
            out.push(unless_missing(&format!(
                "GRANT {}{} ON TABLE {shard} TO {}{}",
                g.privilege,
                g.column
                    .as_deref()
                    .map(|c| format!(" ({})", quote_ident(c)))
                    .unwrap_or_default(),
                g.grantee,
                if g.grantable {
                    " WITH GRANT OPTION"
                } else {
                    ""
                }
            )));
        }
        out.push(format!(
            "ALTER TABLE {shard} {} ROW LEVEL SECURITY",
            if self.row_security {
                "ENABLE"
            } else {
                "DISABLE"
            }
        ));
        out.push(format!(
            "ALTER TABLE {shard} {} ROW LEVEL SECURITY",
            if self.force_row_security {
                "FORCE"
            } else {
                "NO FORCE"
            }
        ));
        for p in &self.policies {
            let mut s = format!(
                "CREATE POLICY {} ON {shard} AS {} FOR {} TO {}",
                quote_ident(&p.name),
                if p.permissive {
                    "PERMISSIVE"
                } else {
                    "RESTRICTIVE"
                },
                p.command,
                p.roles.join(", ")
            );
            if let Some(u) = &p.using {
                s.push_str(&format!(" USING ({u})"));
            }
            if let Some(c) = &p.check {
                s.push_str(&format!(" WITH CHECK ({c})"));
            }
            out.push(unless_missing(&s));
        }
        out
    }
}

/// `'text'`, quotes doubled (standard_conforming_strings is on for the router's own
/// connections).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `stmt`, skipped with a WARNING on a node that lacks a role, table or function it
/// names (roles are not propagated).
fn unless_missing(stmt: &str) -> String {
    // A dollar-quote tag the statement does not hold.
    let mut tag = "sg".to_owned();
    while stmt.contains(&format!("${tag}$")) {
        tag.push('x');
    }
    format!(
        "DO ${tag}$ BEGIN EXECUTE {}; EXCEPTION WHEN undefined_object OR undefined_table OR undefined_function OR undefined_column THEN RAISE WARNING 'shardgate: skipped on this node: %', SQLERRM; END ${tag}$",
        literal(stmt)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_for_a_shard() {
        let p = Privileges {
            owner: "\"App Owner\"".into(),
            grants: vec![
                Grant {
                    privilege: "SELECT".into(),
                    column: None,
                    grantee: "PUBLIC".into(),
                    grantable: false,
                },
                Grant {
                    privilege: "UPDATE".into(),
                    column: Some("it's".into()),
                    grantee: "app".into(),
                    grantable: true,
                },
            ],
            row_security: true,
            force_row_security: false,
            policies: vec![Policy {
                name: "tenant".into(),
                permissive: false,
                command: "SELECT",
                roles: vec!["app".into(), "PUBLIC".into()],
                using: Some(
                    "(tenant = current_setting('app.t'::text)::integer) AND 'x$sg$' <> ''".into(),
                ),
                check: None,
            }],
        };
        let s = p.shard_sql("\"public\".\"t_1\"");
        assert_eq!(s.len(), 7, "{s:#?}");
        assert!(s[0].contains("WHERE c.oid = '\"public\".\"t_1\"'::regclass"));
        assert!(s[1].contains("EXECUTE 'ALTER TABLE \"public\".\"t_1\" OWNER TO \"App Owner\"'"));
        assert!(s[2].contains("EXECUTE 'GRANT SELECT ON TABLE \"public\".\"t_1\" TO PUBLIC'"));
        assert!(s[3].contains(
            "EXECUTE 'GRANT UPDATE (\"it''s\") ON TABLE \"public\".\"t_1\" TO app WITH GRANT OPTION'"
        ));
        assert_eq!(
            s[4],
            "ALTER TABLE \"public\".\"t_1\" ENABLE ROW LEVEL SECURITY"
        );
        assert_eq!(
            s[5],
            "ALTER TABLE \"public\".\"t_1\" NO FORCE ROW LEVEL SECURITY"
        );
        // The policy holds `$sg$`: another tag quotes it.
        assert!(s[6].starts_with("DO $sgx$ BEGIN EXECUTE 'CREATE POLICY \"tenant\" ON \"public\".\"t_1\" AS RESTRICTIVE FOR SELECT TO app, PUBLIC USING ((tenant = current_setting(''app.t''::text)::integer) AND ''x$sg$'' <> '''')';"), "{}", s[6]);
        assert!(s[6].ends_with("END $sgx$"));
    }
}
