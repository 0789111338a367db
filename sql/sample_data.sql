-- Sample data: 10 condominiums, 400 units, about 700 residents, 12 months of charges and
-- payments (about 4,800 rows in transacoes), including the legacy text columns.
-- Deterministic: the same script always produces the same rows.

SELECT setseed(0.42) \gset

INSERT INTO condominios (nome, cnpj, endereco, fundado_em, taxa_base)
SELECT 'Condomínio ' || (ARRAY['Jardim das Flores', 'Residencial Aurora', 'Edifício Atlântico',
                               'Vila Verde', 'Parque das Águas', 'Solar do Ipê', 'Torres do Sol',
                               'Recanto Feliz', 'Morada do Lago', 'Edifício São Paulo'])[g],
       lpad(g::text, 2, '0') || '.345.678/0001-' || lpad((g * 7 % 100)::text, 2, '0'),
       jsonb_build_object('logradouro', 'Rua ' || g, 'numero', 100 + g, 'cidade',
                          (ARRAY['São Paulo', 'Campinas', 'Santos', 'Curitiba', 'Recife'])[1 + g % 5], 'uf',
                          (ARRAY['SP', 'SP', 'SP', 'PR', 'PE'])[1 + g % 5]),
       date '1985-01-01' + (g * 977),
       450 + g * 35.5
FROM generate_series(1, 10) AS g;

INSERT INTO imoveis (condominio_id, bloco, numero, tipo, area_m2, fracao_ideal, ocupado)
SELECT 1 + (g - 1) / 40,
       chr(65 + ((g - 1) % 40) / 10),
       ((g - 1) % 10 + 1)::text || '0' || ((g - 1) % 4 + 1)::text,
       (ARRAY['apartamento', 'apartamento', 'apartamento', 'casa', 'sala', 'garagem'])[1 + g % 6],
       round((35 + random() * 150)::numeric, 2),
       round((1.0 / 40)::numeric, 6),
       random() > 0.1
FROM generate_series(1, 400) AS g;

INSERT INTO moradores (imovel_id, nome, cpf, email, telefone, tipo, data_nascimento, tags, observacoes)
SELECT 1 + (g - 1) % 400,
       (ARRAY['Ana', 'Bruno', 'Carla', 'Diego', 'Elaine', 'Fábio', 'Gabriela', 'Hélio', 'Íris', 'João'])[1 + g % 10]
         || ' ' || (ARRAY['Silva', 'Souza', 'Oliveira', 'Lima', 'Conceição', 'Araújo', 'Gonçalves'])[1 + g % 7],
       lpad((g * 7919 % 1000000000)::text, 9, '0') || '-' || lpad((g % 100)::text, 2, '0'),
       'morador' || g || '@exemplo.com.br',
       '+55 11 9' || lpad((g * 4567 % 100000000)::text, 8, '0'),
       (ARRAY['proprietario', 'inquilino', 'dependente'])[1 + g % 3],
       date '1950-01-01' + (g * 37 % 20000),
       CASE WHEN g % 4 = 0 THEN ARRAY['pet', 'garagem'] WHEN g % 4 = 1 THEN ARRAY['conselho'] ELSE NULL END,
       CASE WHEN g % 50 = 0 THEN repeat('observação longa ', 200) END
FROM generate_series(1, 700) AS g;

INSERT INTO transacoes (imovel_id, morador_id, tipo, status, valor, competencia, vencimento, pago_em,
                        detalhes, data_pagamento_informada, valor_informado)
SELECT i.id,
       (SELECT m.id FROM moradores m WHERE m.imovel_id = i.id ORDER BY m.id LIMIT 1),
       CASE WHEN (i.id + mes) % 17 = 0 THEN 'multa' WHEN (i.id + mes) % 11 = 0 THEN 'fundo_reserva' ELSE 'taxa_condominial' END,
       s.status,
       round((c.taxa_base * (0.8 + i.fracao_ideal * 10))::numeric, 2),
       to_char(date '2024-01-01' + make_interval(months => mes), 'YYYY-MM'),
       (date '2024-01-10' + make_interval(months => mes))::date,
       CASE WHEN s.status = 'paga' THEN timestamptz '2024-01-08 10:00:00-03' + make_interval(months => mes, days => (i.id % 5)::int) END,
       jsonb_build_object('origem', 'boleto', 'parcela', 1),
       CASE WHEN s.status = 'paga' THEN
         CASE (i.id + mes) % 4
           WHEN 0 THEN to_char(date '2024-01-08' + make_interval(months => mes), 'DD/MM/YYYY')
           WHEN 1 THEN to_char(date '2024-01-08' + make_interval(months => mes), 'YYYY-MM-DD')
           WHEN 2 THEN to_char(date '2024-01-08' + make_interval(months => mes), 'YYYY-MM-DD') || ' 10:00:00-03'
           ELSE to_char(date '2024-01-08' + make_interval(months => mes), 'YYYY-MM-DD') || 'T13:00:00Z' END
       END,
       CASE (i.id + mes) % 3
         WHEN 0 THEN to_char(c.taxa_base, 'FM999999990.00')
         WHEN 1 THEN replace(replace(replace(to_char(c.taxa_base, 'FM999G999G990D00'), ',', '#'), '.', ','), '#', '.')
         ELSE 'R$ ' || replace(replace(replace(to_char(c.taxa_base, 'FM999G999G990D00'), ',', '#'), '.', ','), '#', '.') END
FROM imoveis i
JOIN condominios c ON c.id = i.condominio_id
CROSS JOIN generate_series(0, 11) AS mes
CROSS JOIN LATERAL (SELECT CASE WHEN mes < 10 THEN 'paga' WHEN (i.id + mes) % 3 = 0 THEN 'atrasada' ELSE 'aberta' END AS status) s;
