-- Occupancy per condominium: units, occupied units, and active residents.
SELECT
    c.id                                                  AS condominio_id,
    c.nome                                                AS condominio,
    count(DISTINCT i.id)                                  AS unidades,
    count(DISTINCT CASE WHEN i.ocupado THEN i.id END)     AS unidades_ocupadas,
    round(100.0 * count(DISTINCT CASE WHEN i.ocupado THEN i.id END)
          / nullif(count(DISTINCT i.id), 0), 1)           AS ocupacao_pct,
    count(DISTINCT CASE WHEN m.ativo THEN m.id END)       AS moradores_ativos
FROM condominios c
LEFT JOIN imoveis i   ON i.condominio_id = c.id
LEFT JOIN moradores m ON m.imovel_id = i.id
GROUP BY c.id, c.nome
