-- Operator set-up for wal2delta on the source database. Run it once, as a superuser or as
-- the owner of the tables, in the database to replicate:
--
--   psql -d app -v password='a-strong-password' -f sql/setup.sql
--
-- It creates a least-privilege role `wal2delta` (LOGIN REPLICATION, SELECT on the
-- published tables and nothing else) and the publication `wal2delta` for the four tables.
-- Edit the table list to publish other tables. Safe to run again.
\set ON_ERROR_STOP on

SELECT format('CREATE ROLE wal2delta LOGIN REPLICATION PASSWORD %L', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'wal2delta')
\gexec

GRANT USAGE ON SCHEMA public TO wal2delta;
GRANT SELECT ON public.condominios, public.imoveis, public.moradores, public.transacoes TO wal2delta;

SELECT 'CREATE PUBLICATION wal2delta FOR TABLE public.condominios, public.imoveis, public.moradores, public.transacoes WITH (publish_via_partition_root = true)'
WHERE NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'wal2delta')
\gexec
