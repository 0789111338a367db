// What the jdbc test runs: the PostgreSQL JDBC driver (pgjdbc) against the SQL endpoint, as
// DBeaver, Metabase and other JDBC tools use it. Run: java -cp postgresql.jar JdbcCheck.java URL
// Prints one line per check ("name: value"); the Rust test asserts on them. Any exception
// fails the program with its SQLState.
import java.sql.*;
import java.util.*;

public class JdbcCheck {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        Properties props = new Properties();
        props.setProperty("user", "analyst");
        props.setProperty("password", "");
        // Server-side prepared statements from the first execution, as tools tuned for
        // speed set it (the default switches after five).
        props.setProperty("prepareThreshold", "1");
        try (Connection c = DriverManager.getConnection(url, props)) {
            DatabaseMetaData md = c.getMetaData();
            System.out.println("product: " + md.getDatabaseProductName() + " " + md.getDatabaseProductVersion());

            List<String> schemas = new ArrayList<>();
            try (ResultSet rs = md.getSchemas()) {
                while (rs.next()) schemas.add(rs.getString("TABLE_SCHEM"));
            }
            System.out.println("schemas: " + String.join(",", schemas));

            List<String> tables = new ArrayList<>();
            try (ResultSet rs = md.getTables(null, null, "%", new String[] {"TABLE", "VIEW"})) {
                while (rs.next()) {
                    tables.add(rs.getString("TABLE_SCHEM") + "." + rs.getString("TABLE_NAME") + ":" + rs.getString("TABLE_TYPE"));
                }
            }
            Collections.sort(tables);
            System.out.println("tables: " + String.join(",", tables));

            List<String> columns = new ArrayList<>();
            try (ResultSet rs = md.getColumns(null, "public", "pedidos", "%")) {
                while (rs.next()) {
                    columns.add(rs.getInt("ORDINAL_POSITION") + " " + rs.getString("COLUMN_NAME") + " "
                        + rs.getString("TYPE_NAME") + " " + rs.getInt("DATA_TYPE") + " "
                        + (rs.getInt("NULLABLE") == DatabaseMetaData.columnNoNulls ? "not-null" : "nullable"));
                }
            }
            System.out.println("columns: " + String.join(",", columns));

            List<String> keys = new ArrayList<>();
            try (ResultSet rs = md.getPrimaryKeys(null, "public", "pedidos")) {
                while (rs.next()) keys.add(rs.getString("COLUMN_NAME") + "#" + rs.getInt("KEY_SEQ"));
            }
            System.out.println("primary key: " + String.join(",", keys));
            keys.clear();
            try (ResultSet rs = md.getPrimaryKeys(null, null, "itens")) {
                while (rs.next()) keys.add(rs.getString("TABLE_SCHEM") + "." + rs.getString("COLUMN_NAME") + "#" + rs.getInt("KEY_SEQ") + ":" + rs.getString("PK_NAME"));
            }
            System.out.println("composite key: " + String.join(",", keys));

            // A prepared statement with parameters, executed more than once, and types mapped.
            try (PreparedStatement ps = c.prepareStatement(
                    "SELECT id, cliente, valor, criado_em, dia, pago FROM pedidos WHERE id = ? AND valor >= ?")) {
                for (int round = 0; round < 3; round++) {
                    ps.setInt(1, 2);
                    ps.setBigDecimal(2, new java.math.BigDecimal("0.5"));
                    try (ResultSet rs = ps.executeQuery()) {
                        ResultSetMetaData m = rs.getMetaData();
                        if (round == 0) {
                            List<String> types = new ArrayList<>();
                            for (int i = 1; i <= m.getColumnCount(); i++) {
                                types.add(m.getColumnName(i) + ":" + m.getColumnTypeName(i) + ":" + m.getColumnClassName(i));
                            }
                            System.out.println("result types: " + String.join(",", types));
                        }
                        while (rs.next()) {
                            System.out.println("row " + round + ": " + rs.getLong("id") + "|" + rs.getString("cliente") + "|"
                                + rs.getBigDecimal("valor").toPlainString() + "|"
                                + rs.getObject("criado_em", java.time.OffsetDateTime.class).toInstant() + "|"
                                + rs.getObject("dia", java.time.LocalDate.class) + "|" + rs.getBoolean("pago"));
                        }
                    }
                }
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT count(*) FROM pedidos WHERE cliente = ?")) {
                ps.setString(1, "Ana");
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    System.out.println("count for Ana: " + rs.getLong(1));
                }
            }

            // Statement.cancel from another thread stops a long statement with 57014, and
            // the connection stays usable.
            try (Statement st = c.createStatement()) {
                Thread canceller = new Thread(() -> {
                    try { Thread.sleep(500); st.cancel(); } catch (Exception e) { throw new RuntimeException(e); }
                });
                long started = System.nanoTime();
                canceller.start();
                try {
                    st.executeQuery("SELECT count(*) FROM generate_series(1, 20000000000) a");
                    System.out.println("cancel: not cancelled");
                } catch (SQLException e) {
                    System.out.println("cancel: " + e.getSQLState() + " after " + (System.nanoTime() - started) / 1_000_000 + " ms");
                }
                canceller.join();
                try (ResultSet rs = st.executeQuery("SELECT 1")) {
                    rs.next();
                    System.out.println("after cancel: " + rs.getInt(1));
                }
            }

            // Writes are refused with read-only SQLState 25006.
            try (Statement st = c.createStatement()) {
                st.executeUpdate("DELETE FROM pedidos");
                System.out.println("write: accepted");
            } catch (SQLException e) {
                System.out.println("write: " + e.getSQLState());
            }
        }
        System.out.println("done");
    }
}
