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

/// One privilege of one grantee: `privilege [(column)] TO grantee [WITH GRANT OPTION]`,
/// granted by `grantor`.
#[derive(Debug, Clone, PartialEq)]
struct Grant {
    privilege: String,
    column: Option<String>,
    /// `PUBLIC` or a quoted role name.
    grantee: String,
    grantable: bool,
    /// A quoted role name: the owner, or a grantee with the grant option.
    grantor: String,
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
        // the shard (owned by whoever created it) ends up with exactly the same. Then
        // the column grants (column NULL: the table's).
        let grants: Vec<Grant> = c
            .query(
                &format!(
                    "SELECT a.privilege_type, NULL::text, {role}, a.is_grantable,
                            a.grantor::regrole::text, 0::int2 AS n
                     FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                     WHERE c.oid = $1
                     UNION ALL
                     SELECT a.privilege_type, att.attname::text, {role}, a.is_grantable,
                            a.grantor::regrole::text, att.attnum
                     FROM pg_attribute att, aclexplode(att.attacl) a
                     WHERE att.attrelid = $1 AND att.attnum > 0 AND NOT att.attisdropped
                       AND att.attacl IS NOT NULL
                     ORDER BY 6, 3, 1",
                    role = role("a.grantee")
                ),
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| Grant {
                privilege: r.get(0),
                column: r.get(1),
                grantee: r.get(2),
                grantable: r.get(3),
                grantor: r.get(4),
            })
            .collect();
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

    /// The statements that give `shard` (qualified and quoted) these privileges, the
    /// parts `scope` names, whatever it had: its grants (every grantee's, column
    /// grants included) or its policies are dropped first. The owner and the
    /// row-level-security switches change only where they differ, so a grantee that is
    /// not the owner can run a GRANT sync.
    pub fn shard_sql(&self, shard: &str, scope: Scope) -> Vec<String> {
        let rel = literal(shard);
        let role = "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END";
        let mut out = Vec::new();
        if matches!(scope, Scope::All | Scope::OwnerAndSecurity) {
            // A missing owner fails the statement: skipping it would leave the shard
            // to its creator, who would then bypass its row-level security.
            out.push(guarded(&format!(
                "IF (SELECT relowner FROM pg_class WHERE oid = {rel}::regclass) <> {}::regrole THEN
                     EXECUTE {}; END IF;",
                literal(&self.owner),
                literal(&format!("ALTER TABLE {shard} OWNER TO {}", self.owner))
            )));
            for (column, on, off, want) in [
                ("relrowsecurity", "ENABLE", "DISABLE", self.row_security),
                (
                    "relforcerowsecurity",
                    "FORCE",
                    "NO FORCE",
                    self.force_row_security,
                ),
            ] {
                out.push(guarded(&format!(
                    "IF (SELECT {column} FROM pg_class WHERE oid = {rel}::regclass) <> {want} THEN
                         EXECUTE {}; END IF;",
                    literal(&format!(
                        "ALTER TABLE {shard} {} ROW LEVEL SECURITY",
                        if want { on } else { off }
                    ))
                )));
            }
        }
        if matches!(scope, Scope::All | Scope::Grants) {
            // CASCADE: grants a grantee made with its grant option go with it (they
            // are granted again below if the table has them).
            out.push(guarded(&format!(
                "DECLARE r record; BEGIN
                 FOR r IN SELECT DISTINCT {role} AS who FROM pg_class c,
                         aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                         WHERE c.oid = {rel}::regclass
                     UNION SELECT DISTINCT {role} FROM pg_attribute att, aclexplode(att.attacl) a
                         WHERE att.attrelid = {rel}::regclass AND att.attacl IS NOT NULL LOOP
                     EXECUTE format('REVOKE ALL ON TABLE %s FROM %s CASCADE', {rel}::regclass, r.who);
                 END LOOP; END;"
            )));
            for g in &self.grants {
                let grant = format!(
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
                );
                // Granted by its own grantor, as on the coordinator: by the login that
                // is that grantor, or by a superuser taking its role. Another login
                // (the owner, for a grant a grantee made) leaves it out: the REVOKE
                // above took it away, so the shard has fewer rights, never more.
                out.push(unless_missing(&format!(
                    "IF current_user::regrole = {grantor}::regrole THEN
                         EXECUTE {grant};
                     ELSIF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                         EXECUTE 'SET LOCAL ROLE ' || {grantor};
                         EXECUTE {grant};
                         RESET ROLE;
                     END IF;",
                    grantor = literal(&g.grantor),
                    grant = literal(&grant),
                )));
            }
        }
        if matches!(scope, Scope::All | Scope::Policies) {
            out.push(guarded(&format!(
                "DECLARE r record; BEGIN
                 FOR r IN SELECT polname FROM pg_policy WHERE polrelid = {rel}::regclass LOOP
                     EXECUTE format('DROP POLICY %I ON %s', r.polname, {rel}::regclass);
                 END LOOP; END;"
            )));
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
                // A policy a node cannot have (a role, table or function it lacks)
                // fails the statement: skipped, a restrictive one would give rights,
                // and a permissive one would silently hide rows.
                out.push(s);
            }
        }
        out
    }
}

/// Which of a table's privileges a statement changed (and its shards get again).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scope {
    /// A new shard: everything.
    All,
    /// GRANT / REVOKE.
    Grants,
    /// CREATE / ALTER / DROP POLICY.
    Policies,
    /// ALTER TABLE ... OWNER TO / ENABLE | DISABLE ROW LEVEL SECURITY (a new owner
    /// takes over the old one's grants on the shard as on the coordinator).
    OwnerAndSecurity,
}

/// `E'text'`: quotes and backslashes doubled, read alike whatever
/// `standard_conforming_strings` is.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A dollar-quote tag that `text` does not hold.
fn tag_for(text: &str) -> String {
    let mut tag = "sg".to_owned();
    while text.contains(&format!("${tag}$")) {
        tag.push('x');
    }
    tag
}

/// `body` (PL/pgSQL statements, or a block starting with DECLARE) as a DO statement.
fn guarded(body: &str) -> String {
    let tag = tag_for(body);
    if body.starts_with("DECLARE") {
        format!("DO ${tag}$ {body} ${tag}$")
    } else {
        format!("DO ${tag}$ BEGIN {body} END ${tag}$")
    }
}

/// A statement (or, ending in `;`, PL/pgSQL statements) skipped with a WARNING on a
/// node that lacks a role, table or function it names (roles are not propagated):
/// only for statements whose absence leaves fewer rights, never more.
fn unless_missing(stmt: &str) -> String {
    let body = if stmt.ends_with(';') {
        stmt.to_owned()
    } else {
        format!("EXECUTE {};", literal(stmt))
    };
    let tag = tag_for(&body);
    format!(
        "DO ${tag}$ BEGIN {body} EXCEPTION WHEN undefined_object OR undefined_table OR undefined_function OR undefined_column THEN RAISE WARNING 'shardgate: skipped on this node: %', SQLERRM; END ${tag}$"
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
                    grantor: "\"App Owner\"".into(),
                },
                Grant {
                    privilege: "UPDATE".into(),
                    column: Some("it's".into()),
                    grantee: "app".into(),
                    grantable: true,
                    grantor: "app".into(),
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
        let shard = "\"public\".\"t_1\"";
        let s = p.shard_sql(shard, Scope::All);
        assert_eq!(s.len(), 8, "{s:#?}");
        // The owner changes only where it differs; a missing owner is not skipped.
        assert!(s[0].contains("<> E'\"App Owner\"'::regrole"), "{}", s[0]);
        assert!(s[0].contains("EXECUTE E'ALTER TABLE \"public\".\"t_1\" OWNER TO \"App Owner\"'"));
        assert!(!s[0].contains("EXCEPTION"));
        assert!(s[1].contains(
            "relrowsecurity FROM pg_class WHERE oid = E'\"public\".\"t_1\"'::regclass) <> true"
        ));
        assert!(s[1].contains("ENABLE ROW LEVEL SECURITY"));
        assert!(s[2].contains("<> false") && s[2].contains("NO FORCE ROW LEVEL SECURITY"));
        // Every grantee's grants go first, column grants' too, with what they granted.
        assert!(s[3].contains("aclexplode(att.attacl)") && s[3].contains("CASCADE"));
        assert!(s[4].contains("EXECUTE E'GRANT SELECT ON TABLE \"public\".\"t_1\" TO PUBLIC'"));
        assert!(s[4].contains("EXCEPTION WHEN undefined_object"));
        // Each grant by its own grantor.
        assert!(s[4].contains("IF current_user::regrole = E'\"App Owner\"'::regrole THEN"));
        assert!(
            s[5].contains("EXECUTE 'SET LOCAL ROLE ' || E'app';"),
            "{}",
            s[5]
        );
        assert!(s[5].contains(
            "EXECUTE E'GRANT UPDATE (\"it''s\") ON TABLE \"public\".\"t_1\" TO app WITH GRANT OPTION'"
        ));
        assert!(s[6].contains("DROP POLICY"));
        // A policy is never skipped (a node that cannot have it fails the statement).
        assert!(s[7].starts_with("CREATE POLICY \"tenant\" ON \"public\".\"t_1\" AS RESTRICTIVE FOR SELECT TO app, PUBLIC USING ((tenant"), "{}", s[7]);
        // Scopes.
        assert_eq!(p.shard_sql(shard, Scope::Grants).len(), 3);
        assert_eq!(p.shard_sql(shard, Scope::Policies).len(), 2);
        assert_eq!(p.shard_sql(shard, Scope::OwnerAndSecurity).len(), 3);
        // A grant whose text holds `$sg$` is quoted with another tag; a backslash
        // survives the literal.
        let mut q = p.clone();
        q.grants[1].column = Some("x$sg$\\".into());
        let s = q.shard_sql(shard, Scope::Grants);
        assert!(s[2].starts_with("DO $sgx$ BEGIN IF"), "{}", s[2]);
        assert!(s[2].contains("(\"x$sg$\\\\\")"), "{}", s[2]);
        assert!(s[2].ends_with("END $sgx$"));
    }
}
