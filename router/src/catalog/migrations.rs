//! The catalog's schema on the coordinator, as numbered migrations. Each runs once, in
//! order, inside one transaction that holds the catalog lock, and is recorded in
//! `shardgate.schema_migrations`; a router that finds a newer schema than it knows
//! leaves it as it is and warns.

/// (version, name, SQL). Never edit a released migration: add a new one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "citus-compatible metadata tables",
        r#"
CREATE TABLE shardgate.catalog_state (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    version bigint NOT NULL
);
INSERT INTO shardgate.catalog_state (version) VALUES (1);

CREATE SEQUENCE shardgate.pg_dist_node_nodeid_seq;
CREATE SEQUENCE shardgate.pg_dist_groupid_seq;
CREATE TABLE shardgate.pg_dist_node (
    nodeid integer PRIMARY KEY DEFAULT nextval('shardgate.pg_dist_node_nodeid_seq'),
    groupid integer NOT NULL,
    nodename text NOT NULL,
    nodeport integer NOT NULL DEFAULT 5432,
    noderack text NOT NULL DEFAULT 'default',
    hasmetadata boolean NOT NULL DEFAULT false,
    isactive boolean NOT NULL DEFAULT true,
    noderole text NOT NULL DEFAULT 'primary',
    nodecluster text NOT NULL DEFAULT 'default',
    metadatasynced boolean NOT NULL DEFAULT false,
    shouldhaveshards boolean NOT NULL DEFAULT true,
    UNIQUE (nodename, nodeport)
);

CREATE SEQUENCE shardgate.pg_dist_colocationid_seq;
CREATE TABLE shardgate.pg_dist_colocation (
    colocationid integer PRIMARY KEY,
    shardcount integer NOT NULL,
    replicationfactor integer NOT NULL,
    distributioncolumntype oid NOT NULL,
    distributioncolumncollation oid NOT NULL DEFAULT 0,
    -- The distribution plugin that placed the group's rows (name; content hash).
    distplugin text,
    distpluginhash text
);

CREATE TABLE shardgate.pg_dist_partition (
    logicalrelid regclass PRIMARY KEY,
    partmethod "char" NOT NULL,
    -- The distribution column's name (Citus keeps a node tree here).
    partkey text,
    colocationid integer NOT NULL DEFAULT 0,
    repmodel "char" NOT NULL DEFAULT 's',
    autoconverted boolean NOT NULL DEFAULT false,
    distplugin text,
    distpluginhash text
);

CREATE SEQUENCE shardgate.pg_dist_shardid_seq START 102008;
CREATE TABLE shardgate.pg_dist_shard (
    logicalrelid regclass NOT NULL,
    shardid bigint PRIMARY KEY,
    shardstorage "char" NOT NULL DEFAULT 't',
    shardminvalue text,
    shardmaxvalue text,
    -- 0-based position among the table's shards (what the distribution scheme yields).
    shardindex integer NOT NULL
);
CREATE INDEX pg_dist_shard_logicalrelid_idx ON shardgate.pg_dist_shard (logicalrelid);

CREATE SEQUENCE shardgate.pg_dist_placement_placementid_seq;
CREATE TABLE shardgate.pg_dist_placement (
    placementid bigint PRIMARY KEY DEFAULT nextval('shardgate.pg_dist_placement_placementid_seq'),
    shardid bigint NOT NULL REFERENCES shardgate.pg_dist_shard ON DELETE CASCADE,
    shardstate integer NOT NULL DEFAULT 1,
    shardlength bigint NOT NULL DEFAULT 0,
    groupid integer NOT NULL
);
CREATE INDEX pg_dist_placement_shardid_idx ON shardgate.pg_dist_placement (shardid);
"#,
    ),
    (
        2,
        "commit records of prepared transactions",
        r#"
-- One row per transaction prepared on a worker whose change the coordinator committed;
-- deleted once the worker committed it. A prepared transaction without a row here
-- belongs to a change that did not commit.
CREATE TABLE shardgate.pg_dist_transaction (
    groupid integer NOT NULL,
    gid text PRIMARY KEY
);
"#,
    ),
    (
        3,
        "guard on the coordinator's tables of distributed tables",
        r#"
-- The coordinator keeps an empty table for each distributed or reference table (its
-- definition). Rows written there would be stranded, whoever writes them (a router
-- that has not seen the change yet, a direct connection): only shardgate's own admin
-- work (which sets shardgate.admin) may write.
CREATE FUNCTION shardgate.guard_shell() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF coalesce(current_setting('shardgate.admin', true), '') <> 'on' THEN
        RAISE EXCEPTION 'table % is distributed: its rows live in the shards', TG_TABLE_NAME
            USING ERRCODE = '0A000', HINT = 'write through shardgate';
    END IF;
    RETURN NULL;
END
$fn$;
"#,
    ),
];
