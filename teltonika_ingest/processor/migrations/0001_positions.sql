-- positions (contract.md section 9): a TimescaleDB hypertable when the extension can be
-- created, else a table partitioned by range of ts (daily partitions made ahead by
-- positions_ensure_partitions, older or far-future rows in positions_default).
DO $migration$
DECLARE
    columns CONSTANT text := $cols$
        device_id       text             NOT NULL,
        ts              timestamptz      NOT NULL,
        received_at     timestamptz      NOT NULL,
        codec           text             NOT NULL,
        priority        smallint         NOT NULL,
        longitude       double precision NOT NULL,
        latitude        double precision NOT NULL,
        altitude        integer          NOT NULL,
        angle           integer          NOT NULL,
        satellites      integer          NOT NULL,
        speed           integer          NOT NULL,
        event_io_id     integer          NOT NULL,
        generation_type smallint,
        attributes      jsonb            NOT NULL,
        io              jsonb,
        gps_valid       boolean,
        time_valid      boolean,
        CONSTRAINT positions_device_ts UNIQUE (device_id, ts)
    $cols$;
    timescale boolean := false;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            timescale := true;
        EXCEPTION WHEN OTHERS THEN
            -- e.g. packaged but not in shared_preload_libraries
            RAISE WARNING 'timescaledb is available but cannot be created (%): '
                'using native partitioning', SQLERRM;
        END;
    END IF;
    IF timescale THEN
        EXECUTE 'CREATE TABLE positions (' || columns || ')';
        EXECUTE $q$SELECT create_hypertable('positions', 'ts',
                                            chunk_time_interval => interval '1 day')$q$;
    ELSE
        EXECUTE 'CREATE TABLE positions (' || columns || ') PARTITION BY RANGE (ts)';
        CREATE TABLE positions_default PARTITION OF positions DEFAULT;
    END IF;
END
$migration$;

-- "where was this device at ...": the unique index (device_id, ts) serves it.

CREATE TABLE last_positions (
    device_id   text             PRIMARY KEY,
    ts          timestamptz      NOT NULL,
    received_at timestamptz      NOT NULL,
    codec       text             NOT NULL,
    longitude   double precision NOT NULL,
    latitude    double precision NOT NULL,
    altitude    integer          NOT NULL,
    angle       integer          NOT NULL,
    satellites  integer          NOT NULL,
    speed       integer          NOT NULL,
    gps_valid   boolean,
    time_valid  boolean,
    updated_at  timestamptz      NOT NULL DEFAULT now()
);

-- One daily partition [day, day + 1) of positions; rows of that day already in
-- positions_default are moved into it. Returns whether it created one. Instances racing
-- here are serialised by a transaction-level advisory lock. A no-op on a hypertable.
CREATE FUNCTION positions_ensure_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    part text := 'positions_' || to_char(day, 'YYYYMMDD');
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table
                   WHERE partrelid = 'positions'::regclass) THEN
        RETURN false;
    END IF;
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('positions_ensure_partition'));
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE positions INCLUDING DEFAULTS)', part);
    EXECUTE format('INSERT INTO %I SELECT * FROM positions_default WHERE ts >= %L AND ts < %L',
                   part, lo, hi);
    EXECUTE format('DELETE FROM positions_default WHERE ts >= %L AND ts < %L', lo, hi);
    EXECUTE format('ALTER TABLE positions ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lo, hi);
    RETURN true;
END
$fn$;

-- Partitions for the days first_day .. last_day (relative to today, UTC); returns how many
-- it created.
CREATE FUNCTION positions_ensure_partitions(first_day integer, last_day integer)
RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    made integer := 0;
BEGIN
    FOR offset_days IN first_day .. last_day LOOP
        IF positions_ensure_partition(today + offset_days) THEN
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END
$fn$;
