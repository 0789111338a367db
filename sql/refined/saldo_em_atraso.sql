-- Overdue balance per unit and resident: transactions marked overdue, or still open past
-- their due date.
SELECT
    i.condominio_id,
    t.imovel_id,
    i.bloco,
    i.numero,
    t.morador_id,
    m.nome              AS morador,
    count(*)            AS transacoes_em_atraso,
    sum(t.valor)        AS saldo_em_atraso,
    min(t.vencimento)   AS vencimento_mais_antigo
FROM transacoes t
JOIN imoveis i        ON i.id = t.imovel_id
LEFT JOIN moradores m ON m.id = t.morador_id
WHERE t.status = 'atrasada'
   OR (t.status = 'aberta' AND t.vencimento < current_date)
GROUP BY i.condominio_id, t.imovel_id, i.bloco, i.numero, t.morador_id, m.nome
