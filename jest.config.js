/** Unit tests of the extension's pure logic (src/__tests__), compiled by ts-jest. */
module.exports = {
  testEnvironment: 'node',
  testRegex: 'src/__tests__/.*\\.test\\.ts$',
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }] }
};
