-- Monthly amounts per condominium, by transaction type and status.
SELECT
    c.id            AS condominio_id,
    c.nome          AS condominio,
    t.competencia,
    t.tipo,
    t.status,
    count(*)        AS transacoes,
    sum(t.valor)    AS valor_total
FROM transacoes t
JOIN imoveis i     ON i.id = t.imovel_id
JOIN condominios c ON c.id = i.condominio_id
GROUP BY c.id, c.nome, t.competencia, t.tipo, t.status
